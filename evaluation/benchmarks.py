"""The evaluation benchmark registry: held-out test files -> QUESTION_SCHEMA rows, with skip counts.

Each :class:`BenchmarkSpec` names the canonical held-out file(s) of one benchmark inside the
benchmark data folder (``../shared/data`` by default; see its README's "Benchmark TEST sets"
table) and the EXISTING source loader (:data:`octomed_data.sources.FORMATS`) that reads them, so
evaluation and ingest parse every file the same way. Items a loader quarantines (an image that is
not available here -> ``missing_image``, a malformed record) are counted per reason and reported
as *skipped*, never dropped silently; records of the file outside the benchmark's test split
(PubMedQA's 500 non-test PQA-L items) are counted as *excluded*.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from octomed_data.errors import ConfigError
from octomed_data.images import ImageStore
from octomed_data.sources import iter_records

ENV_DATA_DIR = "OCTOMED_EVAL_DATA"
REPO_ROOT = Path(__file__).resolve().parent.parent
PAPER_CITATION = "OctoMed, arXiv 2511.23269"


@dataclass(frozen=True)
class BenchmarkSpec:
    """One held-out benchmark: where its test file is and which loader reads it."""

    name: str
    title: str
    fmt: str  # a key of octomed_data.sources.FORMATS
    files: tuple[str, ...]  # relative to the data folder; the first that exists is read ...
    images: str | None = None  # image folder relative to the data folder (absent here: items skipped)
    split: str | None = "test"  # keep only rows the loader put in this split; None: every row
    all_files: bool = False  # ... or, when True, every listed file is read (SLAKE open + closed)
    paper_octomed_7b: float | None = None  # accuracy (%) the paper reports for OctoMed-7B
    note: str = ""
    missing_hint: str = ""  # what to do when the file is not there (PMC-VQA)
    options: dict[str, Any] = field(default_factory=dict)  # extra loader options

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "format": self.fmt,
            "files": list(self.files),
            "images": self.images,
            "split": self.split,
            "paper_octomed_7b": self.paper_octomed_7b,
            "note": self.note,
        }


BENCHMARKS: dict[str, BenchmarkSpec] = {
    b.name: b
    for b in (
        BenchmarkSpec(
            "medqa", "MedQA-USMLE (4 options)", "medqa", ("medqa/phrases_no_exclude_test.jsonl",),
            paper_octomed_7b=90.81,
        ),
        BenchmarkSpec(
            "medmcqa", "MedMCQA dev", "medmcqa", ("medmcqa/dev.json",), split="dev", paper_octomed_7b=72.70
        ),
        BenchmarkSpec(
            "pubmedqa", "PubMedQA PQA-L test (500)", "pubmedqa", ("pubmedqa/ori_pqal.json",),
            note="the 500 ids of test_ground_truth.json; the other 500 PQA-L items are excluded",
        ),
        BenchmarkSpec(
            "mmlu_medical", "MMLU medical (6 subjects)", "mmlu", ("mmlu_medical",),
            note="anatomy, clinical_knowledge, college_biology, college_medicine, medical_genetics, "
            "professional_medicine",
        ),
        BenchmarkSpec(
            "mmlu_pro_medical", "MMLU-Pro medical", "mmlu_pro", ("huatuogpt_o1_eval/MMLU-Pro_Medical_test.json",)
        ),
        BenchmarkSpec(
            "medxpertqa_text", "MedXpertQA Text", "medxpertqa", ("medxpertqa/medxpertqa_text.jsonl",),
            paper_octomed_7b=24.51,
        ),
        BenchmarkSpec(
            "medxpertqa_mm", "MedXpertQA MM", "medxpertqa", ("medxpertqa/medxpertqa_mm_input.jsonl",),
            images="medxpertqa/images", paper_octomed_7b=36.65,
            note="images are distributed only in the HF dataset's zip: put them in medxpertqa/images",
        ),
        BenchmarkSpec("medbullets_op4", "MedBullets (4 options)", "medbullets", ("medreason_eval/medbullets_op4.jsonl",)),
        BenchmarkSpec("medbullets_op5", "MedBullets (5 options)", "medbullets", ("medreason_eval/medbullets_op5.jsonl",)),
        BenchmarkSpec(
            "vqa_rad", "VQA-RAD test", "vqa_rad", ("vqa_rad/testset.json",), images="vqa_rad/images",
            note="closed yes/no -> yes_no_maybe, open answers -> open_vqa (exact match + token F1)",
        ),
        BenchmarkSpec(
            "slake", "SLAKE 1.0 test (English)", "slake", ("slake/test_open.csv", "slake/test_close.csv"),
            images="slake/imgs", all_files=True,
            note="images are not public in git: put the xmlab* folders in slake/imgs",
        ),
        BenchmarkSpec(
            "pathvqa", "PathVQA test", "pathvqa", ("pathvqa/pvqa_test.json",), images="pathvqa/images",
            note="images are copyrighted and not here: put <img_id>.jpg in pathvqa/images",
        ),
        BenchmarkSpec(
            "omnimedvqa", "OmniMedVQA (MedVLM-R1 MR/CT/X-ray 900)", "omnimedvqa",
            ("omnimedvqa/MRI_CT_XRAY_300each_dataset.json",), images="omnimedvqa",
            note="11 of the 900 images are public in git (omnimedvqa/images); the rest are skipped",
        ),
        BenchmarkSpec(
            "omnimedvqa_xray", "OmniMedVQA X-ray test (Med-R1 split)", "omnimedvqa",
            ("omnimedvqa/med_r1_splits/X-Ray_test.json",), images="omnimedvqa",
        ),
        BenchmarkSpec(
            "pmc_vqa", "PMC-VQA test", "pmc_vqa", ("pmc_vqa/test_clean.csv", "pmc_vqa/test.csv"),
            images="pmc_vqa/images", split=None, paper_octomed_7b=61.13,
            missing_hint="PMC-VQA is distributed on the HF hub only (xmcmic/PMC-VQA): put test_clean.csv "
            "(or test.csv) in <data-dir>/pmc_vqa/ and the figures in <data-dir>/pmc_vqa/images/",
        ),
    )
}  # fmt: skip


def resolve_data_dir(data_dir: str | None = None) -> Path:
    """The benchmark folder: ``data_dir``, else ``$OCTOMED_EVAL_DATA``, else ``../shared/data`` of the repo."""
    chosen = data_dir or os.environ.get(ENV_DATA_DIR) or str(REPO_ROOT.parent / "shared" / "data")
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise ConfigError(f"benchmark data folder not found: {path} (pass --data-dir or set {ENV_DATA_DIR})")
    return path.resolve()


def get_benchmarks(names: list[str] | str) -> list[BenchmarkSpec]:
    """Specs for ``names`` (a list or a comma-separated string); an unknown name is one clear error."""
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    wanted = [n.strip() for n in names if n and n.strip()]
    if not wanted:
        raise ConfigError("no benchmarks named; see `octomed-data eval --list`")
    unknown = [n for n in wanted if n not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    return [BENCHMARKS[n] for n in dict.fromkeys(wanted)]


def benchmark_files(spec: BenchmarkSpec, data_dir: Path) -> list[Path]:
    """The file(s) to read for ``spec``; a missing file is one clear error (with the spec's hint)."""
    present = [data_dir / f for f in spec.files if (data_dir / f).exists()]
    if not present or (spec.all_files and len(present) != len(spec.files)):
        hint = f": {spec.missing_hint}" if spec.missing_hint else ""
        raise ConfigError(f"benchmark {spec.name!r}: {' / '.join(spec.files)} not found in {data_dir}{hint}")
    return present if spec.all_files else present[:1]


@dataclass
class LoadStats:
    """What loading one benchmark did: items kept, skipped (by reason), excluded (other splits)."""

    items: int = 0
    skipped: Counter = field(default_factory=Counter)
    excluded: int = 0
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "excluded_other_split": self.excluded,
            "files": self.files,
        }


def iter_benchmark(
    spec: BenchmarkSpec,
    data_dir: Path,
    image_store: ImageStore,
    stats: LoadStats,
    limit: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Question rows of ``spec`` in file order (streamed), at most ``limit``; counts go to ``stats``.

    With ``limit``, reading stops at the ``limit``-th evaluable item: the skip counts then cover
    the records read up to it, which is what was looked at.
    """
    images = data_dir / spec.images if spec.images else None
    for path in benchmark_files(spec, data_dir):
        stats.files.append(str(path))
        records = iter_records(
            spec.fmt,
            str(path),
            image_store=image_store,
            images_dir=str(images) if images is not None and images.is_dir() else None,
            source=spec.name,
            **spec.options,
        )
        for kind, row in records:
            if kind == "quarantine":
                stats.skipped[row["reason"]] += 1
                continue
            if spec.split is not None and row["split"] != spec.split:
                stats.excluded += 1
                continue
            stats.items += 1
            yield row
            if limit is not None and stats.items >= limit:
                return


def list_benchmarks(data_dir: str | None = None) -> list[dict[str, Any]]:
    """The registry as rows (name, title, files, whether the files are present) for ``eval --list``."""
    try:
        root: Path | None = resolve_data_dir(data_dir)
    except ConfigError:
        root = None
    rows = []
    for spec in BENCHMARKS.values():
        present = root is not None and any((root / f).exists() for f in spec.files)
        images = bool(root is not None and spec.images and (root / spec.images).is_dir())
        rows.append({**spec.to_dict(), "present": present, "images_present": images})
    return rows
