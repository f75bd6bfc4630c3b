"""Export a mixture for SFT: LLaMA-Factory sharegpt and TRL / HF conversational, both as Parquet.

``OUT/llamafactory/{train,validation}`` rows: ``messages`` = [{role, content}] (user, assistant),
``images`` = list of image URIs; ``OUT/llamafactory/dataset_info.json`` registers both splits.
The user turn starts with one ``<image>`` token per image; literal ``<image>`` (and the other
LLaMA-Factory placeholders) inside question or trace text are escaped, so the number of
``<image>`` tokens always equals ``len(images)``.

``OUT/trl/{train,validation}`` rows: ``messages`` = [{role, content: [{type, text}]}] with one
``{"type": "image"}`` part per image, and ``images`` as HF ``Image`` values (PNG bytes embedded
by default, so the export is self-contained, also on ``s3://``).

Turns: the system prompt and user text the teacher saw (:mod:`octomed_data.prompts`, also what
evaluation asks), then the assistant turn ``<think>reasoning</think>`` and the teacher's response.
Every export shard mirrors one mixture shard, so exports stream with bounded memory.
Load either with ``datasets.load_dataset("parquet", data_files=Dataset(uri).files(),
storage_options=storage.storage_options(uri))``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from octomed_data import storage
from octomed_data.errors import ConfigError, StorageError
from octomed_data.prompts import render_question, system_prompt

FORMATS = ("llamafactory", "trl")
SPLITS = ("train", "validation")
IMAGE_TOKEN = "<image>"
# LLaMA-Factory counts these placeholders in text; a literal one in a trace would break the
# image/token alignment, so it is rewritten to a visibly different, harmless form.
_PLACEHOLDER_ESCAPES = {"<image>": "<image\u200b>", "<video>": "<video\u200b>", "<audio>": "<audio\u200b>"}

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
LLAMAFACTORY_SCHEMA = pa.schema(
    [
        pa.field("messages", pa.list_(MESSAGE_TYPE), nullable=False),
        pa.field("images", pa.list_(pa.string()), nullable=False),
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("teacher", pa.string(), nullable=False),
    ],
    metadata={"octomed.schema": "export.llamafactory", "octomed.schema_version": "1"},
)


def _trl_schema() -> pa.Schema:
    """TRL schema with HF ``features`` metadata, so ``load_dataset`` decodes images to PIL."""
    import datasets

    features = datasets.Features(
        {
            "messages": datasets.List(
                {
                    "role": datasets.Value("string"),
                    "content": datasets.List(
                        {"type": datasets.Value("string"), "text": datasets.Value("string")}
                    ),
                }
            ),
            "images": datasets.List(datasets.Image()),
            "question_id": datasets.Value("string"),
            "source": datasets.Value("string"),
            "teacher": datasets.Value("string"),
        }
    )
    schema = features.arrow_schema
    meta = dict(schema.metadata or {})
    meta.update({b"octomed.schema": b"export.trl", b"octomed.schema_version": b"1"})
    return schema.with_metadata(meta)


@dataclass
class ExportResult:
    """Where each format and split went."""

    uri: str
    datasets: dict[str, dict[str, str]] = field(default_factory=dict)  # format -> split -> URI
    rows: dict[str, dict[str, int]] = field(default_factory=dict)
    escaped_placeholders: int = 0  # literal placeholders rewritten in text
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def escape_placeholders(text: str | None) -> tuple[str, int]:
    """Rewrite literal ``<image>``/``<video>``/``<audio>`` so they are not placeholder tokens."""
    if not text:
        return text or "", 0
    n = 0
    for token, repl in _PLACEHOLDER_ESCAPES.items():
        k = text.count(token)
        if k:
            text = text.replace(token, repl)
            n += k
    return text, n


def user_text(row: Mapping[str, Any]) -> str:
    """The question exactly as the teacher saw it (and as evaluation asks it)."""
    return render_question(row)


def assistant_text(row: Mapping[str, Any]) -> str:
    """``<think>reasoning</think>`` then the teacher's response (its final answer part)."""
    reasoning = (row.get("reasoning") or "").strip()
    response = (row.get("response") or "").strip()
    return f"<think>\n{reasoning}\n</think>\n\n{response}"


def conversation(row: Mapping[str, Any]) -> tuple[str, str, int]:
    """(user text without image tokens, assistant text, number of placeholders escaped)."""
    user, n1 = escape_placeholders(user_text(row))
    assistant, n2 = escape_placeholders(assistant_text(row))
    return user, assistant, n1 + n2


def llamafactory_row(row: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """One sharegpt row: ``<image>`` tokens first in the user turn, one per image."""
    user, assistant, escaped = conversation(row)
    images = [im["uri"] for im in row.get("images") or []]
    user = IMAGE_TOKEN * len(images) + user
    return {
        "messages": [
            {"role": "system", "content": system_prompt(row["task_type"])},
            {"role": "user", "content": user},
            {"role": "assistant", "content": assistant},
        ],
        "images": images,
        "question_id": row["question_id"],
        "source": row["source"],
        "teacher": row["teacher"],
    }, escaped


def trl_row(row: Mapping[str, Any], *, embed_images: bool = True) -> tuple[dict[str, Any], int]:
    """One conversational row with ``{"type": "image"}`` parts and HF image values."""
    user, assistant, escaped = conversation(row)
    images = list(row.get("images") or [])
    content = [{"type": "image", "text": None} for _ in images] + [{"type": "text", "text": user}]
    values = [
        {"bytes": storage.read_bytes(im["uri"]) if embed_images else None, "path": im["uri"]} for im in images
    ]
    return {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": system_prompt(row["task_type"])}]},
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": assistant}]},
        ],
        "images": values,
        "question_id": row["question_id"],
        "source": row["source"],
        "teacher": row["teacher"],
    }, escaped


def dataset_info(prefix: str = "octomed") -> dict[str, Any]:
    """LLaMA-Factory ``dataset_info.json`` for the two split folders next to it.

    The folders are registered as ``script_url``, not ``file_name``: for a ``file_name`` folder
    LLaMA-Factory hands *every* directory entry to ``load_dataset`` and stops with "File types
    should be identical" at the storage layer's ``_manifest/`` folder. ``script_url`` makes it
    call ``load_dataset(<folder>)``, whose file discovery reads the Parquet shards only.
    """
    entry = {
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
            "system_tag": "system",
        },
    }
    return {f"{prefix}_{split}": {"script_url": split, "split": "train", **entry} for split in SPLITS}


def export(
    mixture_uri: str,
    out: str,
    *,
    formats: Sequence[str] | None = None,
    embed_images: bool = True,
    progress: bool = False,
) -> ExportResult:
    """Export every split of the mixture at ``mixture_uri`` to ``out/<format>/<split>``."""
    from tqdm import tqdm

    formats = list(formats or FORMATS)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ConfigError(f"unknown export format(s) {unknown}; choose from {list(FORMATS)}")
    t0 = time.time()
    sources = {s: storage.Dataset(storage.join(mixture_uri, s)) for s in SPLITS}
    if not any(ds.manifest() for ds in sources.values()):
        raise StorageError(f"no mixture shards under {mixture_uri} (expected train/ and validation/)")
    storage.ensure_writable(out)
    result = ExportResult(uri=out)
    trl_schema = _trl_schema() if "trl" in formats else None
    for fmt in formats:
        result.datasets[fmt], result.rows[fmt] = {}, {}
        for split, src in sources.items():
            schema = LLAMAFACTORY_SCHEMA if fmt == "llamafactory" else trl_schema
            target = storage.Dataset(storage.join(out, fmt, split), schema)
            _clear(target)
            total = 0
            manifest = src.manifest()
            for shard in tqdm(manifest, desc=f"export {fmt}/{split}", disable=not progress):
                rows: list[dict[str, Any]] = []
                for row in src.iter_rows(shards=[shard]):
                    if fmt == "llamafactory":
                        converted, escaped = llamafactory_row(row)
                    else:
                        converted, escaped = trl_row(row, embed_images=embed_images)
                    rows.append(converted)
                    result.escaped_placeholders += escaped
                target.write_shard(shard, pa.Table.from_pylist(rows, schema=schema))
                total += len(rows)
            result.datasets[fmt][split] = target.uri
            result.rows[fmt][split] = total
        if fmt == "llamafactory":
            storage.write_json(storage.join(out, fmt, "dataset_info.json"), dataset_info())
    # Placeholders are counted once per format; report them per exported row set.
    result.escaped_placeholders //= max(1, len(formats))
    result.seconds = round(time.time() - t0, 3)
    storage.write_json(storage.join(out, "export.json"), {"mixture": mixture_uri} | result.to_dict())
    return result


def _clear(ds: storage.Dataset) -> None:
    """Drop earlier shards so a re-export of a smaller mixture leaves no stale shard behind."""
    for name in list(ds.manifest()):
        ds.delete_shard(name)


def load_export(uri: str, **kwargs: Any):
    """``datasets.load_dataset`` over one exported split (local or object store)."""
    import datasets

    files = storage.Dataset(uri).files()
    if not files:
        raise StorageError(f"no exported shards at {uri}")
    return datasets.load_dataset(
        "parquet", data_files=files, split="train", storage_options=storage.storage_options(uri), **kwargs
    )
