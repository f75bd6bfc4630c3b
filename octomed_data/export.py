"""Export a mixture for SFT: LLaMA-Factory sharegpt and TRL conversational, both as Parquet.

Layout (every folder is self-contained: copy it anywhere, or download it from ``s3://``)::

    OUT/export.json                       settings (answer format, image references) and counts
    OUT/llamafactory/dataset_info.json    registers octomed_train / octomed_validation
    OUT/llamafactory/export.json          the same metadata, for a folder copied alone
    OUT/llamafactory/images/ab/<sha256>.png   each image once (copied or hard-linked), content-addressed
    OUT/llamafactory/{train,validation}/  rows: messages [{role, content: str}], images [path]
    OUT/trl/dataset_info.json             which configuration is for which model
    OUT/trl/README.md                     dataset card: load_dataset(OUT/trl, "text" | "vision")
    OUT/trl/text/{train,validation}/      text rows, TRL language-modelling form: string content,
                                          no images column (text-only models)
    OUT/trl/vision/{train,validation}/    every row, TRL vision form: typed content parts with one
                                          {"type": "image"} per image, images as HF Image values (VLMs)

LLaMA-Factory: the user turn starts with one ``<image>`` token per image; literal placeholders in
question or trace text are escaped, so the number of ``<image>`` tokens always equals
``len(images)``. Image paths are relative to ``OUT/llamafactory``, which LLaMA-Factory resolves
against its ``media_dir`` (default: ``dataset_dir``): pass ``dataset_dir=OUT/llamafactory``.
``llamafactory_images="absolute"`` writes the run's image URIs instead (shared filesystems only).

TRL: images are embedded PNG bytes by default (``embed_images=False``: the run's image URIs).

Side columns (both formats, every row): ``question_id``, ``source``, ``teacher`` and the verifier's
provenance of the trace, ``verifier`` (exact | normalized | judge), ``verifier_rule`` (exact |
numeric | plural | synonym | judge) and ``judge_correct`` (the LLM judge's verdict when it was
asked), so a judge-accepted trace can be told from an exact match or left out (null: the mixture
did not carry it). The trainers read ``messages`` (and ``images``) only; LLaMA-Factory's sharegpt
``columns`` name those two, and TRL drops the other columns.

Turns: the system prompt and user text the teacher saw (:mod:`octomed_data.prompts`, also what
evaluation asks), then the assistant turn ``<think>reasoning</think>`` and the teacher's response.
``answer_format="normalize"`` (default) makes every response end in the line the system prompt
asks for, ``Final answer: \\boxed{X}``: the reply's answer is read with
:func:`octomed_data.answers.extract_answer` and must be the accepted one (otherwise the row is
dropped and counted), a short final answer line is replaced, anything else gets the line appended;
the reasoning is never touched. ``"as_is"`` keeps the responses and uses a system prompt that
states no answer format. ``content="answer_only"`` (the recipe lab's direct arm: the paper's "direct
answers" training data) drops each trace's reasoning and its reply's explanation: the assistant turn is
the normalised answer line alone (no ``<think>``), under the direct system prompt that evaluation's
``direct`` protocol asks with; it needs ``answer_format="normalize"`` (the answer line is the one
normalisation writes, from the accepted answer). Every export shard mirrors one mixture shard, so exports stream with
bounded memory. :func:`load_export` loads one exported split (local or object store).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from octomed_data import storage
from octomed_data.errors import ConfigError, StorageError
from octomed_data.export_formats import (
    EXPORT_VERSION,
    LLAMAFACTORY_SCHEMA,
    ImageBundle,
    dataset_info,
    llamafactory_image,
    llamafactory_row,
    trl_card,
    trl_dataset_info,
    trl_schemas,
    trl_text_row,
    trl_vision_row,
)
from octomed_data.export_turns import (
    IMAGE_TOKEN,
    check_settings,
    escape_placeholders,
    export_system_prompt,
    final_answer_line,
    normalize_reply,
    prepare,
)
from octomed_data.layout import SPLITS, ExportFolder

FORMATS = ("llamafactory", "trl")
IMAGE_REFS = ("relative", "absolute")

__all__ = [  # re-exported: the names other modules import from here
    "EXPORT_VERSION", "IMAGE_TOKEN", "LLAMAFACTORY_SCHEMA", "ExportResult", "escape_placeholders", "export",
    "final_answer_line", "load_export", "normalize_reply",
]  # fmt: skip


@dataclass
class ExportResult:
    """Where each dataset and split went, and what the export did.

    ``datasets`` keys: ``llamafactory``; ``trl`` (the vision configuration: every row, for VLMs and
    the project's trainer); ``trl_text`` (the text configuration: text rows only).
    """

    uri: str
    datasets: dict[str, dict[str, str]] = field(default_factory=dict)  # dataset -> split -> URI
    rows: dict[str, dict[str, int]] = field(default_factory=dict)
    escaped_placeholders: int = 0  # literal placeholders rewritten in text (per exported row set)
    answers: dict[str, int] = field(default_factory=dict)  # kept / replaced / appended / dropped / as_is
    images: dict[str, int] = field(
        default_factory=dict
    )  # LLaMA-Factory image files: copied / linked / reused
    settings: dict[str, Any] = field(default_factory=dict)
    # Exported traces per verifier that accepted them (exact | normalized | judge | unknown: the
    # mixture did not carry it).
    verified_by: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export(
    mixture_uri: str,
    out: str,
    *,
    formats: Sequence[str] | None = None,
    embed_images: bool = True,
    llamafactory_images: str = "relative",
    answer_format: str = "normalize",
    content: str = "reasoning",
    progress: bool = False,
) -> ExportResult:
    """Export every split of the mixture at ``mixture_uri`` to ``out`` (layout: module docstring)."""
    from tqdm import tqdm

    formats = list(formats or FORMATS)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ConfigError(f"unknown export format(s) {unknown}; choose from {list(FORMATS)}")
    check_settings(answer_format, content)
    if llamafactory_images not in IMAGE_REFS:
        raise ConfigError(
            f"unknown llamafactory_images {llamafactory_images!r}; choose from {list(IMAGE_REFS)}"
        )
    t0 = time.time()
    sources = {s: storage.Dataset(storage.join(mixture_uri, s)) for s in SPLITS}
    if not any(ds.manifest() for ds in sources.values()):
        raise StorageError(f"no mixture shards under {mixture_uri} (expected train/ and validation/)")
    storage.ensure_writable(out)
    settings = {
        "export_version": EXPORT_VERSION,
        "answer_format": answer_format,
        "content": content,
        "final_answer_line": final_answer_line("X") if answer_format == "normalize" else None,
        "system_prompts": {
            t: export_system_prompt(t, answer_format, content)
            for t in ("text_mcq", "yes_no_maybe", "open_qa")
        },
        "llamafactory_images": llamafactory_images,
        "embed_images": embed_images,
    }
    result = ExportResult(uri=out, settings=settings)
    folder = ExportFolder(out)
    lf_dir, trl_dir = folder.llamafactory, folder.trl
    targets: dict[str, dict[str, storage.Dataset]] = {}
    schemas = trl_schemas() if "trl" in formats else {}
    if "llamafactory" in formats:
        targets["llamafactory"] = {
            s: storage.Dataset(storage.join(lf_dir, s), LLAMAFACTORY_SCHEMA) for s in SPLITS
        }
    if "trl" in formats:
        targets["trl"] = {s: storage.Dataset(folder.trl_split(False, s), schemas["vision"]) for s in SPLITS}
        targets["trl_text"] = {s: storage.Dataset(folder.trl_split(True, s), schemas["text"]) for s in SPLITS}
        for s in SPLITS:  # the single-dataset layout of export version 1
            _clear(storage.Dataset(storage.join(trl_dir, s)))
    for per_split in targets.values():
        for ds in per_split.values():
            _clear(ds)
    bundle = ImageBundle(lf_dir)
    answers: Counter[str] = Counter()
    verified: Counter[str] = Counter()
    for split, src in sources.items():
        totals: Counter[str] = Counter()
        for shard in tqdm(src.manifest(), desc=f"export {split}", disable=not progress):
            out_rows: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
            for row in src.iter_rows(shards=[shard]):
                turns = prepare(row, answer_format, content)
                if turns is None:
                    answers["dropped"] += 1
                    continue
                answers[turns.answer] += 1
                verified[row.get("verifier") or "unknown"] += 1
                result.escaped_placeholders += turns.escaped
                if "llamafactory" in targets:
                    paths = [llamafactory_image(im, bundle, llamafactory_images) for im in turns.images]
                    out_rows["llamafactory"].append(llamafactory_row(row, turns, paths))
                if "trl" in targets:
                    out_rows["trl"].append(trl_vision_row(row, turns, embed_images=embed_images))
                    if not turns.images:
                        out_rows["trl_text"].append(trl_text_row(row, turns))
            for name, rows in out_rows.items():
                ds = targets[name][split]
                ds.write_shard(shard, pa.Table.from_pylist(rows, schema=ds.schema))
                totals[name] += len(rows)
        for name, per_split in targets.items():
            result.datasets.setdefault(name, {})[split] = per_split[split].uri
            result.rows.setdefault(name, {})[split] = totals[name]
    result.answers = dict(sorted(answers.items()))
    result.verified_by = dict(sorted(verified.items()))
    result.images = dict(sorted(bundle.counts.items()))
    result.seconds = round(time.time() - t0, 3)
    meta = {"mixture": mixture_uri} | result.to_dict()
    if "llamafactory" in formats:
        storage.write_json(folder.dataset_info(lf_dir), dataset_info())
        storage.write_json(folder.format_summary(lf_dir), meta)
    if "trl" in formats:
        storage.write_json(folder.dataset_info(trl_dir), trl_dataset_info(result.rows))
        storage.write_bytes(folder.card(trl_dir), trl_card().encode("utf-8"))
        storage.write_json(folder.format_summary(trl_dir), meta)
    storage.write_json(folder.summary, meta)
    return result


def _clear(ds: storage.Dataset) -> None:
    """Drop earlier shards so a re-export of a smaller mixture leaves no stale shard behind."""
    ds.drop_stale(keep=[])


def load_export(uri: str, **kwargs: Any):
    """``datasets.load_dataset`` over one exported split (local or object store)."""
    import datasets

    files = storage.Dataset(uri).files()
    if not files:
        raise StorageError(f"no exported shards at {uri}")
    return datasets.load_dataset(
        "parquet", data_files=files, split="train", storage_options=storage.storage_options(uri), **kwargs
    )
