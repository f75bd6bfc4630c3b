"""The benchmark registry: every held-out test item decontamination must keep out of training.

One :class:`BenchmarkSpec` per held-out file of THE benchmark table
(:data:`octomed_data.benchmarks.BENCHMARKS`, which evaluation reads too): the canonical file of each
benchmark defines the items and their ids; the other copies (5-option variants, evaluation
bundles, official subsets, per-language CSVs) are linked back to those ids by their normalised question text (plus the image name for VQA), so a copy
adds rows only where its text differs. Per item the registry keeps the question text (the fields
the README names; appended "Answer Choices:" blocks cut off), the option texts, whether the item
is image-grounded, and for the images that exist here (VQA-RAD 12, OmniMedVQA 11) the SHA-256 and
pHash computed exactly as ingest computes them (:func:`octomed_data.images.fingerprint`).

``build_registry(data_dir)`` returns the table; ``write_registry`` stores it as a compact zstd
Parquet "registry pack". The pack built from ``../shared/data`` ships in the package
(``octomed_data/registry/benchmarks.parquet``) so a clean clone decontaminates against the full
registry without the benchmark files; :func:`load_registry` reads it by default.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import octomed_data.benchmarks as benchmark_table
from octomed_data import storage
from octomed_data.decontam.text import normalized_text, strip_choices
from octomed_data.errors import OctomedError
from octomed_data.images import fingerprint, open_raster
from octomed_data.schema import REGISTRY_SCHEMA, options_of

log = logging.getLogger(__name__)

BUNDLED_REGISTRY = Path(__file__).resolve().parent / "registry" / "benchmarks.parquet"


# The HuatuoGPT-o1 bundle puts this instruction between a PubMedQA abstract and its question;
# it is template text, not benchmark content (16-gram matching on it would flag any prompt using it).
_HUATUO_PUBMEDQA_INSTRUCTION = (
    "Using the above document as a reference, please review the following question "
    "and choose the option you find most appropriate."
)
_R1_OPTION = re.compile(r"(?:^|[\s,])\(?([A-J])\)\s*(.*?)(?=,?\s*\(?[A-J]\)|\Z)", re.DOTALL)


class RegistryError(OctomedError):
    """A registry pack or benchmark folder cannot be used."""


@dataclass(frozen=True)
class RawItem:
    """One record of a benchmark file, before linking copies to canonical ids."""

    item_id: str | None  # None for copies without their own id
    text: str
    options: tuple[str, ...] = ()
    image: str | None = None  # path relative to the data dir, when the image exists there
    image_name: str = ""  # links VQA copies (same question text on different images)
    # The image's SHA-256 and pHash when the reader already has them from ingest's own loader
    # (DICOM / NIfTI images, which a raster reader cannot open): used instead of ``image``.
    fingerprint: tuple[str, int] | None = None


@dataclass(frozen=True)
class BenchmarkSpec:
    """One held-out file: which benchmark it belongs to and how to read its items."""

    benchmark: str
    file: str  # relative to the data dir
    reader: Callable[[Path, Path], Iterator[RawItem]]  # (file path, data dir) -> items
    canonical: bool  # canonical files define item ids; copies link to them
    image_grounded: bool = False
    records: int | None = None  # records the README lists for this file


# --------------------------------------------------------------------------- readers


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except ValueError as exc:
                raise RegistryError(f"{path}:{lineno}: not JSON ({exc})") from None


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RegistryError(f"{path}: not JSON ({exc})") from None


def _option_texts(options: Any) -> tuple[str, ...]:
    """Option texts from {"A": ...}, [{"letter", "content"}], or a list of strings."""
    if isinstance(options, dict):
        return tuple(str(v) for v in options.values())
    if isinstance(options, list):
        return tuple(str(o.get("content", "")) if isinstance(o, dict) else str(o) for o in options)
    return ()


def read_medqa(path: Path, data_dir: Path) -> Iterator[RawItem]:
    """MedQA jsonl (4- or 5-option): ``question``, ``options``; ids test-00000... by position."""
    for i, r in enumerate(_jsonl(path)):
        yield RawItem(f"test-{i:05d}", r["question"], _option_texts(r.get("options")))


def read_eval_input(path: Path, data_dir: Path) -> Iterator[RawItem]:
    """MedXpertQA-eval style jsonl: ``id``, ``question`` (with "Answer Choices:" appended), ``options``."""
    for r in _jsonl(path):
        yield RawItem(r.get("id"), r["question"], _option_texts(r.get("options")))


def read_medmcqa(path: Path, data_dir: Path) -> Iterator[RawItem]:
    """MedMCQA dev.json (JSON Lines): ``id``, ``question``, ``opa``..``opd``."""
    for r in _jsonl(path):
        yield RawItem(
            r["id"], r["question"], tuple(str(r.get(k) or "") for k in ("opa", "opb", "opc", "opd"))
        )


def read_huatuo(path: Path, data_dir: Path) -> Iterator[RawItem]:
    """HuatuoGPT-o1 bundle: a JSON array of ``question``/``options``; ids by position."""
    for i, r in enumerate(_json(path)):
        text = r["question"].replace(_HUATUO_PUBMEDQA_INSTRUCTION, "\n")
        yield RawItem(str(i), text, _option_texts(r.get("options")))


def read_pubmedqa(path: Path, data_dir: Path) -> Iterator[RawItem]:
    """PubMedQA ori_pqal.json: PMID -> ``CONTEXTS`` + ``QUESTION`` (all 1000 PQA-L items held out)."""
    for pmid, r in _json(path).items():
        text = "\n".join(r.get("CONTEXTS") or []) + "\n" + r["QUESTION"]
        yield RawItem(str(pmid), text, ("yes", "no", "maybe"))


def read_mmlu_csv(path: Path, data_dir: Path) -> Iterator[RawItem]:
    """MMLU CSV without header: question, A, B, C, D, answer; ids ``subject:index``."""
    subject = path.name.removesuffix("_test.csv")
    with path.open(encoding="utf-8", newline="") as fh:
        for i, row in enumerate(csv.reader(fh)):
            if len(row) < 6:
                raise RegistryError(f"{path}: row {i} has {len(row)} columns, expected 6")
            yield RawItem(f"{subject}:{i}", row[0], tuple(row[1:5]))


def read_medxpertqa_hf(path: Path, data_dir: Path) -> Iterator[RawItem]:
    """MedXpertQA HF dump: ``id``, ``question`` (choices appended), ``options`` dict."""
    for r in _jsonl(path):
        yield RawItem(r["id"], r["question"], _option_texts(r.get("options")))


def read_medbullets(path: Path, data_dir: Path) -> Iterator[RawItem]:
    """MedBullets (MedReason packaging): ``question``, ``options``; ids by position in op4."""
    for i, r in enumerate(_jsonl(path)):
        yield RawItem(str(i), r["question"], _option_texts(r.get("options")))


def _existing(data_dir: Path, rel: str) -> str | None:
    return rel if (data_dir / rel).is_file() else None


def read_vqa_rad_testset(path: Path, data_dir: Path) -> Iterator[RawItem]:
    """VQA-RAD testset.json: ``qid``, ``question``, ``image_name`` (12 images present here)."""
    for r in _json(path):
        name = r["image_name"]
        yield RawItem(str(r["qid"]), r["question"], (), _existing(data_dir, f"vqa_rad/images/{name}"), name)


def read_vqa_rad_public(path: Path, data_dir: Path) -> Iterator[RawItem]:
    """VQA-RAD OSF json: only the ``test_freeform`` / ``test_para`` rows are the test split."""
    for r in _json(path):
        if r.get("phrase_type") in ("test_freeform", "test_para"):
            name = r["image_name"]
            yield RawItem(None, r["question"], (), _existing(data_dir, f"vqa_rad/images/{name}"), name)


def read_slake_json(path: Path, data_dir: Path) -> Iterator[RawItem]:
    """SLAKE test.json (en + zh): ``qid``, ``question``, ``img_name`` (no images here)."""
    for r in _json(path):
        yield RawItem(str(r["qid"]), r["question"], (), None, r["img_name"])


def read_slake_csv(path: Path, data_dir: Path) -> Iterator[RawItem]:
    """SLAKE English CSVs: img_id, img_name, question, answer."""
    with path.open(encoding="utf-8", newline="") as fh:
        for r in csv.DictReader(fh):
            yield RawItem(None, r["question"], (), None, r["img_name"])


def read_pathvqa(path: Path, data_dir: Path) -> Iterator[RawItem]:
    """PathVQA LXMERT json: ``sentf.pvqa[j]`` of each ``img_id``; ids ``img_id:j``."""
    for r in _json(path):
        for j, q in enumerate((r.get("sentf") or {}).get("pvqa") or []):
            yield RawItem(f"{r['img_id']}:{j}", q, (), None, r["img_id"])


def read_omnimed_medvlm(path: Path, data_dir: Path) -> Iterator[RawItem]:
    """OmniMedVQA MedVLM-R1 subset: ``question``, ``options``, ``image`` (11 present here)."""
    for i, r in enumerate(_json(path)):
        image = (r.get("image") or [None])[0]
        rel = _existing(data_dir, f"omnimedvqa/{image}") if image else None
        yield RawItem(
            f"medvlm_r1:{i}", r.get("question") or r["problem"], _option_texts(r.get("options")), rel
        )


def read_omnimed_med_r1(path: Path, data_dir: Path) -> Iterator[RawItem]:
    """OmniMedVQA Med-R1 X-Ray split: ``problem`` = stem + " A)x, B)y, ..."."""
    for i, r in enumerate(_json(path)):
        problem = r["problem"]
        stem = strip_choices(problem)
        tail = problem[len(stem) :] if problem.startswith(stem) else ""
        options = tuple(m.group(2).strip().rstrip(",") for m in _R1_OPTION.finditer(tail))
        yield RawItem(f"med_r1_xray:{i}", stem, options, None, str(r.get("image") or ""))


def read_imaging_held_out(path: Path, data_dir: Path) -> Iterator[RawItem]:
    """The recipe lab's held-out imaging classification: the ``imaging`` source's records not sampled
    for training (``rest: test``, :data:`octomed_data.benchmarks.LAB_IMAGING_OPTIONS`), read by the
    source loader itself (ids, options and image fingerprints exactly as evaluation and ingest
    have them; DICOM and NIfTI decoded as ingest decodes them)."""
    from octomed_data.sources import iter_records

    options = benchmark_table.LAB_IMAGING_OPTIONS
    # Evaluation reads it as source <benchmark name>: the same question ids.
    for kind, row in iter_records("imaging", str(path), source=benchmark_table.LAB_IMAGING, **options):
        if kind != "question" or row["split"] != "test":
            continue
        image = row["images"][0]
        yield RawItem(
            row["question_id"],
            row["question"],
            tuple(text for _, text in options_of(row)),
            image_name=str(row["question_id"]),
            fingerprint=(image["sha256"], int(image["phash"])),
        )


# --------------------------------------------------------------------------- the held-out files (THE table)

READERS: dict[str, Callable[[Path, Path], Iterator[RawItem]]] = {
    "medqa": read_medqa,
    "eval_input": read_eval_input,
    "medmcqa": read_medmcqa,
    "huatuo": read_huatuo,
    "pubmedqa": read_pubmedqa,
    "mmlu_csv": read_mmlu_csv,
    "medxpertqa_hf": read_medxpertqa_hf,
    "medbullets": read_medbullets,
    "vqa_rad_testset": read_vqa_rad_testset,
    "vqa_rad_public": read_vqa_rad_public,
    "slake_json": read_slake_json,
    "slake_csv": read_slake_csv,
    "pathvqa": read_pathvqa,
    "omnimed_medvlm": read_omnimed_medvlm,
    "omnimed_med_r1": read_omnimed_med_r1,
    "imaging_held_out": read_imaging_held_out,
}

# The held-out files of THE benchmark table (octomed_data.benchmarks), each with its reader.
SPECS: tuple[BenchmarkSpec, ...] = tuple(
    BenchmarkSpec(b.name, f.file, READERS[f.reader], f.canonical, b.image_grounded, f.records)
    for b, f in benchmark_table.held_out_files()
)

# Distinct held-out items per benchmark, as the data README lists them.
EXPECTED_ITEMS: dict[str, int] = benchmark_table.expected_items()


# --------------------------------------------------------------------------- build / load


def build_registry(
    data_dir: str | Path, specs: tuple[BenchmarkSpec, ...] = SPECS, *, progress: bool = False
) -> pa.Table:
    """Read every held-out file under ``data_dir`` into one registry table (REGISTRY_SCHEMA).

    Canonical files define item ids; a copy's record takes the id of the canonical item with the
    same normalised text (and image name, for VQA), and adds a row only if its text differs.
    A copy record that links to nothing keeps its own id ``<file>#<index>``.
    """
    root = Path(data_dir)
    missing = [s.file for s in specs if not benchmark_table.benchmark_path(root, s.file).is_file()]
    if missing:
        raise RegistryError(f"benchmark files missing under {root}: {', '.join(missing)}")
    # Canonical files first, so every copy can link to their ids.
    ordered = sorted(specs, key=lambda s: (not s.canonical, specs.index(s)))
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    links: dict[tuple[str, str, str], str] = {}
    fingerprints: dict[str, tuple[str, int]] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ordered), desc="registry", unit="file", file=sys.stderr)
    for spec in ordered:
        count = 0
        for index, raw in enumerate(spec.reader(benchmark_table.benchmark_path(root, spec.file), root)):
            count += 1
            text = strip_choices(raw.text)
            norm = normalized_text(text)
            link = (spec.benchmark, raw.image_name, norm)
            if spec.canonical:
                if raw.item_id is None:
                    raise RegistryError(f"{spec.file}: canonical record {index} has no id")
                item_id = raw.item_id
                links.setdefault(link, item_id)
            else:
                item_id = links.get(link) or f"{spec.file}#{index}"
            key = (spec.benchmark, item_id, norm)
            row = rows.get(key)
            if row is not None:
                if spec.file not in row["source_file"].split(";"):
                    row["source_file"] += f";{spec.file}"
                continue
            sha, ph = raw.fingerprint or (None, None)
            if raw.image and raw.fingerprint is None:
                if raw.image not in fingerprints:
                    _, digest, perceptual = fingerprint(open_raster(str(root / raw.image)))
                    fingerprints[raw.image] = (digest, perceptual)
                sha, ph = fingerprints[raw.image]
            rows[key] = {
                "benchmark": spec.benchmark,
                "item_id": item_id,
                "text": text,
                "options": list(raw.options),
                "image_grounded": spec.image_grounded,
                "image_sha256": sha,
                "image_phash": ph,
                "source_file": spec.file,
            }
        if spec.records is not None and count != spec.records:
            log.warning("%s: %d records, the data README lists %d", spec.file, count, spec.records)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    table = pa.Table.from_pylist(list(rows.values()), schema=REGISTRY_SCHEMA)
    # Sorted rows compress better and make the pack byte-stable across builds.
    return table.sort_by([("benchmark", "ascending"), ("item_id", "ascending"), ("text", "ascending")])


def write_registry(table: pa.Table, out: str) -> int:
    """Write a registry pack (zstd Parquet) to ``out`` atomically; returns its size in bytes."""
    sink = pa.BufferOutputStream()
    pq.write_table(
        table.cast(REGISTRY_SCHEMA),
        sink,
        compression="zstd",
        compression_level=19,
        use_dictionary=["benchmark", "source_file"],
    )
    data = sink.getvalue().to_pybytes()
    storage.write_bytes(out, data)
    return len(data)


def load_registry(path: str | None = None) -> pa.Table:
    """Read a registry pack (default: the bundled ``octomed_data/registry/benchmarks.parquet``)."""
    uri = str(path) if path else str(BUNDLED_REGISTRY)
    if not storage.exists(uri):
        hint = " (the bundled pack is missing: run `octomed-data registry build`)" if not path else ""
        raise RegistryError(f"registry pack not found: {uri}{hint}")
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    except (pa.ArrowInvalid, OSError) as exc:
        raise RegistryError(f"not a registry pack: {uri} ({exc})") from None
    missing = [f.name for f in REGISTRY_SCHEMA if f.name not in table.column_names]
    if missing:
        raise RegistryError(f"{uri} lacks registry columns {missing}")
    return table.select(REGISTRY_SCHEMA.names).cast(REGISTRY_SCHEMA)


def registry_counts(table: pa.Table) -> dict[str, dict[str, int]]:
    """Per benchmark: distinct items, rows, and distinct images."""
    items: dict[str, set[str]] = {}
    images: dict[str, set[str]] = {}
    rows: dict[str, int] = {}
    for bench, item, sha in zip(
        table.column("benchmark").to_pylist(),
        table.column("item_id").to_pylist(),
        table.column("image_sha256").to_pylist(),
        strict=True,
    ):
        items.setdefault(bench, set()).add(item)
        rows[bench] = rows.get(bench, 0) + 1
        if sha:
            images.setdefault(bench, set()).add(sha)
    return {
        b: {"items": len(items[b]), "rows": rows[b], "images": len(images.get(b, ()))} for b in sorted(items)
    }
