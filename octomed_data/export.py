"""Export a mixture for SFT: LLaMA-Factory sharegpt and TRL conversational, both as Parquet.

Layout (``llamafactory/`` and ``trl/text`` are self-contained: copy them anywhere, or download them
from ``s3://``; ``trl/vision`` references the run's image store unless ``embed_images``)::

    OUT/export.json                       settings (answer format, image references) and counts
    OUT/llamafactory/dataset_info.json    registers octomed_{train,validation} (every row, vision
                                          models) and octomed_text_{train,validation} (text-only)
    OUT/llamafactory/export.json          the same metadata, for a folder copied alone
    OUT/llamafactory/images/ab/<sha256>.png   each image once (hard-linked to the run's image store
                                          where one filesystem allows, else copied), content-addressed
    OUT/llamafactory/{train,validation}/  rows: messages [{role, content: str}], images [path]
    OUT/llamafactory/text/{train,validation}/  text rows only, no images column (text-only models)
    OUT/trl/dataset_info.json             which configuration is for which model
    OUT/trl/README.md                     dataset card: load_dataset(OUT/trl, "text" | "vision")
    OUT/trl/text/{train,validation}/      text rows, TRL language-modelling form: string content,
                                          no images column (text-only models)
    OUT/trl/vision/{train,validation}/    every row, TRL vision form: typed content parts with one
                                          {"type": "image"} per image, images as HF Image values (VLMs)
                                          that reference the run's image store (embed_images: a copy)

LLaMA-Factory: the user turn starts with one ``<image>`` token per image; literal placeholders in
question or trace text are escaped, so the number of ``<image>`` tokens always equals
``len(images)``. Image paths are relative to ``OUT/llamafactory``, which LLaMA-Factory resolves
against its ``media_dir`` (default: ``dataset_dir``): pass ``dataset_dir=OUT/llamafactory``.
``llamafactory_images="absolute"`` writes the run's image URIs instead (shared filesystems only).

TRL: images are stored once. By default each HF Image value is ``{bytes: None, path: <the run's
content-addressed image URI>}`` (``ingest/images/ab/<sha256>.png``), so the vision configuration
needs the run's image store where it is read (the project's trainer reads the URI, on ``s3://``
too). ``embed_images=True`` writes a self-contained copy instead: the PNG bytes in the Parquet.

Duplicates: two replies that stated the same answer differently become the same row once the
answer line is normalised; only the first is written (:func:`octomed_data.export_turns.trace_key`,
across splits and shards), the others are counted per split in ``duplicates``. A weight's copies
(the mixture's ``copy``) are kept. Memory: the keys of the rows written so far are held up to an
eighth of ``memory_mb`` (default: the ``memory_mb`` the mixture was built with), the rest in an
on-disk table (:mod:`octomed_data.export_dedupe`); the same rows come out whatever the limit.

Keys: every text of every mixture row is scanned for the values of the teachers' API key variables
(``secret_env``; :class:`octomed_data.release_safety.SecretGuard`); a row holding one refuses the
export with one line naming the file, row and column (never the key), and nothing is left written.

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

import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from octomed_data import storage
from octomed_data.errors import ConfigError, StorageError
from octomed_data.export_dedupe import DEFAULT_MEMORY_MB, SeenKeys, dedupe_limit_bytes
from octomed_data.export_formats import (
    EXPORT_VERSION,
    LLAMAFACTORY_SCHEMA,
    LLAMAFACTORY_TEXT_SCHEMA,
    ImageBundle,
    dataset_info,
    llamafactory_image,
    llamafactory_row,
    llamafactory_text_row,
    llamafactory_text_split,
    trl_card,
    trl_dataset_info,
    trl_schemas,
    trl_text_row,
    trl_vision_row,
)
from octomed_data.export_turns import (
    IMAGE_TOKEN,
    Turns,
    check_settings,
    escape_placeholders,
    export_system_prompt,
    final_answer_line,
    normalize_reply,
    prepare,
)
from octomed_data.layout import SPLITS, ExportFolder, MixtureFolder
from octomed_data.release_safety import SecretGuard
from octomed_data.teachers import TeacherConfig

log = logging.getLogger(__name__)

FORMATS = ("llamafactory", "trl")
IMAGE_REFS = ("relative", "absolute")
# The key variable a teacher uses unless its config names another: scanned when the caller names none.
DEFAULT_SECRET_ENV = (TeacherConfig.model_fields["api_key_env"].default,)

__all__ = [  # re-exported: the names other modules import from here
    "DEFAULT_SECRET_ENV", "EXPORT_VERSION", "IMAGE_TOKEN", "LLAMAFACTORY_SCHEMA", "ExportResult",
    "escape_placeholders", "export",
    "final_answer_line", "load_export", "normalize_reply",
]  # fmt: skip


@dataclass
class ExportResult:
    """Where each dataset and split went, and what the export did.

    ``datasets`` keys: ``llamafactory`` (every row, the vision dataset); ``llamafactory_text`` (text
    rows only, no images column: for text-only models); ``trl`` (the vision configuration: every
    row, for VLMs and the project's trainer); ``trl_text`` (the text configuration: text rows only).
    """

    uri: str
    datasets: dict[str, dict[str, str]] = field(default_factory=dict)  # dataset -> split -> URI
    rows: dict[str, dict[str, int]] = field(default_factory=dict)
    escaped_placeholders: int = 0  # literal placeholders rewritten in text (per exported row set)
    answers: dict[str, int] = field(default_factory=dict)  # kept / replaced / appended / dropped / as_is
    # Rows left out per split because an earlier row is the same training example once its answer
    # line is normalised (:func:`octomed_data.export_turns.trace_key`); a weight's copies are kept.
    duplicates: dict[str, int] = field(default_factory=dict)
    images: dict[str, int] = field(
        default_factory=dict
    )  # LLaMA-Factory image files: copied / linked / reused; TRL: trl_embedded / trl_referenced
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
    embed_images: bool = False,
    llamafactory_images: str = "relative",
    answer_format: str = "normalize",
    content: str = "reasoning",
    secret_env: Iterable[str] | None = None,
    progress: bool = False,
    memory_mb: float | None = None,
) -> ExportResult:
    """Export every split of the mixture at ``mixture_uri`` to ``out`` (layout: module docstring).

    ``secret_env``: the environment variables holding the teachers' API keys (default
    :data:`DEFAULT_SECRET_ENV`); a mixture row holding one of their values refuses the export.
    ``memory_mb``: the memory bound of the duplicate check (default: the mixture's ``memory_mb``);
    it changes no output.
    """
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
    if not any(ds.has_committed() for ds in sources.values()):
        raise StorageError(f"no mixture shards under {mixture_uri} (expected train/ and validation/)")
    storage.ensure_writable(out)
    key_names = sorted(set(DEFAULT_SECRET_ENV if secret_env is None else secret_env))
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
        "dedupe": "after answer normalisation (copies of a weight kept)",
        "key_scan": key_names,  # variable names only, never values
    }
    result = ExportResult(uri=out, settings=settings)
    folder = ExportFolder(out)
    targets = _targets(folder, formats)
    pass_ = _Pass(
        targets=targets,
        bundle=ImageBundle(folder.llamafactory),
        guard=SecretGuard.from_env(key_names),
        embed_images=embed_images,
        llamafactory_images=llamafactory_images,
        answer_format=answer_format,
        content=content,
        result=result,
        seen=SeenKeys(
            dedupe_limit_bytes(memory_mb if memory_mb is not None else mixture_memory_mb(mixture_uri))
        ),
    )
    try:
        with pass_.seen:
            for split, src in sources.items():
                pass_.split(split, src, progress)
    except ConfigError:
        for per_split in targets.values():  # a refused export leaves no partial dataset behind
            for ds in per_split.values():
                _clear(ds)
        for folder_ in (folder.llamafactory, folder.trl):  # nor an earlier export's description
            _remove(folder.format_summary(folder_), folder.dataset_info(folder_))
        _remove(folder.summary)
        raise
    result.answers = dict(sorted(pass_.answers.items()))
    result.verified_by = dict(sorted(pass_.verified.items()))
    result.images = dict(sorted((pass_.bundle.counts + pass_.trl_images).items()))
    result.seconds = round(time.time() - t0, 3)
    meta = {"mixture": mixture_uri} | result.to_dict()
    lf_dir, trl_dir = folder.llamafactory, folder.trl
    if "llamafactory" in formats:
        storage.write_json(folder.dataset_info(lf_dir), dataset_info())
        storage.write_json(folder.format_summary(lf_dir), meta)
    if "trl" in formats:
        storage.write_json(
            folder.dataset_info(trl_dir), trl_dataset_info(result.rows, embed_images=embed_images)
        )
        storage.write_bytes(folder.card(trl_dir), trl_card(embed_images=embed_images).encode("utf-8"))
        storage.write_json(folder.format_summary(trl_dir), meta)
    storage.write_json(folder.summary, meta)
    if sum(result.duplicates.values()):
        log.info("export: %s duplicate row(s) left out after answer normalisation", result.duplicates)
    return result


def _targets(folder: ExportFolder, formats: Sequence[str]) -> dict[str, dict[str, storage.Dataset]]:
    """The datasets this export writes (dataset name -> split -> Dataset), emptied first."""
    lf_dir, trl_dir = folder.llamafactory, folder.trl
    targets: dict[str, dict[str, storage.Dataset]] = {}
    if "llamafactory" in formats:
        targets["llamafactory"] = {
            s: storage.Dataset(storage.join(lf_dir, s), LLAMAFACTORY_SCHEMA) for s in SPLITS
        }
        targets["llamafactory_text"] = {
            s: storage.Dataset(llamafactory_text_split(lf_dir, s), LLAMAFACTORY_TEXT_SCHEMA) for s in SPLITS
        }
    if "trl" in formats:
        schemas = trl_schemas()
        targets["trl"] = {s: storage.Dataset(folder.trl_split(False, s), schemas["vision"]) for s in SPLITS}
        targets["trl_text"] = {s: storage.Dataset(folder.trl_split(True, s), schemas["text"]) for s in SPLITS}
        for s in SPLITS:  # the single-dataset layout of export version 1
            _clear(storage.Dataset(storage.join(trl_dir, s)))
    for per_split in targets.values():
        for ds in per_split.values():
            _clear(ds)
    return targets


@dataclass
class _Pass:
    """One export pass: the rows of every split, deduplicated and scanned for keys, per target."""

    targets: dict[str, dict[str, storage.Dataset]]
    bundle: ImageBundle
    guard: SecretGuard
    embed_images: bool
    llamafactory_images: str
    answer_format: str
    content: str
    result: ExportResult
    # Keys of the rows written so far (bounded in memory; the rest on disk).
    seen: SeenKeys = field(default_factory=lambda: SeenKeys(dedupe_limit_bytes(DEFAULT_MEMORY_MB)))
    answers: Counter[str] = field(default_factory=Counter)
    verified: Counter[str] = field(default_factory=Counter)
    trl_images: Counter[str] = field(default_factory=Counter)

    def split(self, split: str, src: storage.Dataset, progress: bool) -> None:
        from tqdm import tqdm

        totals: Counter[str] = Counter()
        duplicates = 0
        for shard in tqdm(src.committed_names(), desc=f"export {split}", disable=not progress):
            out_rows: dict[str, list[dict[str, Any]]] = {name: [] for name in self.targets}
            where = src.file_uri(shard)
            for i, row in enumerate(src.iter_rows(shards=[shard])):
                scan_row(self.guard, row, f"{where} row {i}")
                turns = prepare(row, self.answer_format, self.content)
                if turns is None:
                    self.answers["dropped"] += 1
                    continue
                self.answers[turns.answer] += 1
                if not self.seen.add(turns.key):
                    duplicates += 1
                    continue
                self.verified[row.get("verifier") or "unknown"] += 1
                self.result.escaped_placeholders += turns.escaped
                self.rows(row, turns, out_rows, f"{where} row {i}")
            for name, rows in out_rows.items():
                ds = self.targets[name][split]
                ds.write_shard(shard, pa.Table.from_pylist(rows, schema=ds.schema))
                totals[name] += len(rows)
        for name, per_split in self.targets.items():
            self.result.datasets.setdefault(name, {})[split] = per_split[split].uri
            self.result.rows.setdefault(name, {})[split] = totals[name]
        self.result.duplicates[split] = duplicates

    def rows(
        self, row: dict[str, Any], turns: Turns, out: dict[str, list[dict[str, Any]]], where: str
    ) -> None:
        if "llamafactory" in self.targets:
            paths = [llamafactory_image(im, self.bundle, self.llamafactory_images) for im in turns.images]
            out["llamafactory"].append(llamafactory_row(row, turns, paths))
            if not turns.images:
                out["llamafactory_text"].append(llamafactory_text_row(row, turns))
        if "trl" in self.targets:
            vision = trl_vision_row(row, turns, embed_images=self.embed_images)
            for n, image in enumerate(vision["images"]):
                if image["bytes"] is not None:
                    self.guard.check_bytes(image["bytes"], f"{where} image {n}")
            self.trl_images["trl_embedded" if self.embed_images else "trl_referenced"] += len(turns.images)
            out["trl"].append(vision)
            if not turns.images:
                out["trl_text"].append(trl_text_row(row, turns))


def mixture_memory_mb(mixture_uri: str) -> float:
    """The ``memory_mb`` the mixture at ``mixture_uri`` was built with (its ``mixture.json``), else
    the default."""
    summary = MixtureFolder(mixture_uri).summary
    try:
        value = (
            storage.read_json(summary).get("config", {}).get("memory_mb") if storage.exists(summary) else None
        )
    except (OSError, ValueError, AttributeError):
        value = None
    return float(value) if isinstance(value, int | float) and value > 0 else float(DEFAULT_MEMORY_MB)


def scan_row(guard: SecretGuard, row: dict[str, Any], where: str) -> None:
    """A :class:`ConfigError` in one line when a text column of a mixture row holds a key: which file,
    row and column (never the key itself)."""
    if not guard.secrets:
        return
    for column, value in row.items():
        texts = [value] if isinstance(value, str) else _strings(value)
        for text in texts:
            try:
                guard.check(text, f"{where} column {column!r}")
            except ConfigError as exc:
                raise ConfigError(f"export refused: {exc}".removesuffix("; not published")) from None


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _remove(*uris: str) -> None:
    for uri in uris:
        if storage.exists(uri):
            fs, path = storage.filesystem(uri)
            fs.rm(path)


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
