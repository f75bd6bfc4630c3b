"""The two export formats' rows, schemas and folder metadata: LLaMA-Factory sharegpt (with its
image bundle) and TRL conversational (text and vision configurations). See :mod:`octomed_data.export`."""

from __future__ import annotations

import os
import uuid
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from octomed_data import storage
from octomed_data.errors import ConfigError, StorageError
from octomed_data.export_turns import EXPORT_VERSION, IMAGE_TOKEN, Turns, side_columns
from octomed_data.images import sha256_hex
from octomed_data.layout import SPLITS, image_object
from octomed_data.schema import VERDICT_SCHEMA, VERIFIER_FIELDS

TRL_CONFIGS = ("text", "vision")
IMAGE_DIR = "images"

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
LLAMAFACTORY_SCHEMA = pa.schema(
    [
        pa.field("messages", pa.list_(MESSAGE_TYPE), nullable=False),
        pa.field("images", pa.list_(pa.string()), nullable=False),
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("teacher", pa.string(), nullable=False),
        *[VERDICT_SCHEMA.field(name) for name in VERIFIER_FIELDS],
    ],
    metadata={"octomed.schema": "export.llamafactory", "octomed.schema_version": EXPORT_VERSION},
)
# The text-only dataset: text rows, no images column (a text-only model refuses any image input).
LLAMAFACTORY_TEXT_SCHEMA = LLAMAFACTORY_SCHEMA.remove(
    LLAMAFACTORY_SCHEMA.get_field_index("images")
).with_metadata({"octomed.schema": "export.llamafactory.text", "octomed.schema_version": EXPORT_VERSION})
# LLaMA-Factory's text-only splits live in ``llamafactory/text/<split>`` (named like TRL's configuration).
LLAMAFACTORY_TEXT_DIR = "text"


def _features_schema(features: Any, name: str) -> pa.Schema:
    schema = features.arrow_schema
    meta = dict(schema.metadata or {})
    meta.update({b"octomed.schema": name.encode(), b"octomed.schema_version": EXPORT_VERSION.encode()})
    return schema.with_metadata(meta)


def trl_schemas() -> dict[str, pa.Schema]:
    """TRL schemas with HF ``features`` metadata (``load_dataset`` decodes vision images to PIL)."""
    import datasets

    meta = {
        "question_id": datasets.Value("string"),
        "source": datasets.Value("string"),
        "teacher": datasets.Value("string"),
        "verifier": datasets.Value("string"),
        "verifier_rule": datasets.Value("string"),
        "judge_correct": datasets.Value("bool"),
    }
    text = datasets.Features(
        {
            "messages": datasets.List(
                {"role": datasets.Value("string"), "content": datasets.Value("string")}
            ),
            **meta,
        }
    )
    vision = datasets.Features(
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
            **meta,
        }
    )
    return {
        "text": _features_schema(text, "export.trl.text"),
        "vision": _features_schema(vision, "export.trl.vision"),
    }


def llamafactory_row(row: Mapping[str, Any], turns: Turns, image_paths: Sequence[str]) -> dict[str, Any]:
    """One sharegpt row: ``<image>`` tokens first in the user turn, one per image."""
    return {
        "messages": [
            {"role": "system", "content": turns.system},
            {"role": "user", "content": IMAGE_TOKEN * len(image_paths) + turns.user},
            {"role": "assistant", "content": turns.assistant},
        ],
        "images": list(image_paths),
    } | side_columns(row)


def llamafactory_text_row(row: Mapping[str, Any], turns: Turns) -> dict[str, Any]:
    """One sharegpt row of the text-only dataset: no image token, no images column."""
    if turns.images:
        raise ValueError("an image row has no text-only form")
    out = llamafactory_row(row, turns, [])
    del out["images"]
    return out


def llamafactory_text_split(dataset_dir: str, split: str) -> str:
    """Where a split of the text-only LLaMA-Factory dataset goes (``dataset_dir/text/<split>``)."""
    return storage.join(dataset_dir, LLAMAFACTORY_TEXT_DIR, split)


def trl_text_row(row: Mapping[str, Any], turns: Turns) -> dict[str, Any]:
    """TRL conversational language modelling: string content, no images."""
    if turns.images:
        raise ValueError("an image row has no text-only form")
    return {
        "messages": [
            {"role": "system", "content": turns.system},
            {"role": "user", "content": turns.user},
            {"role": "assistant", "content": turns.assistant},
        ]
    } | side_columns(row)


def trl_vision_row(row: Mapping[str, Any], turns: Turns, *, embed_images: bool = True) -> dict[str, Any]:
    """TRL conversational vision: typed parts, one ``{"type": "image"}`` per image, HF image values."""
    content = [{"type": "image", "text": None} for _ in turns.images] + [{"type": "text", "text": turns.user}]
    if embed_images:
        values = [
            {"bytes": storage.read_bytes(im["uri"]), "path": f"{im['sha256']}.png"} for im in turns.images
        ]
    else:
        # The run's content-addressed image store: each image stays stored once.
        values = [{"bytes": None, "path": storage.absolute_uri(im["uri"])} for im in turns.images]
    return {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": turns.system}]},
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": turns.assistant}]},
        ],
        "images": values,
    } | side_columns(row)


class ImageBundle:
    """Puts each image once into ``<dataset_dir>/images/<sha[:2]>/<sha>.png`` and returns its path
    relative to ``dataset_dir``: hard-linked when source and target are on one local filesystem,
    copied otherwise (bytes checked against the content address). Memory: a bounded set of shas."""

    def __init__(self, dataset_dir: str, remember: int = 65536) -> None:
        self.dataset_dir = dataset_dir
        self.remember = remember
        self._known: OrderedDict[str, None] = OrderedDict()
        self.counts: Counter[str] = Counter()

    def path_for(self, image: Mapping[str, Any]) -> str:
        sha = image["sha256"]
        rel = f"{IMAGE_DIR}/{sha[:2]}/{sha}.png"
        if sha in self._known:
            self._known.move_to_end(sha)
            self.counts["reused"] += 1
            return rel
        target = image_object(storage.join(self.dataset_dir, IMAGE_DIR), sha)
        if storage.exists(target):
            self.counts["reused"] += 1
        elif not self._link(image["uri"], target):
            data = storage.read_bytes(image["uri"])
            if sha256_hex(data) != sha:
                raise StorageError(f"image {image['uri']} does not match its content address {sha}")
            storage.write_bytes(target, data)
            self.counts["copied"] += 1
        self._known[sha] = None
        if len(self._known) > self.remember:
            self._known.popitem(last=False)
        return rel

    def _link(self, source: str, target: str) -> bool:
        if storage.protocol_of(source) != "file" or storage.protocol_of(target) != "file":
            return False
        src, dst = source.removeprefix("file://"), target.removeprefix("file://")
        tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.{uuid.uuid4().hex}.tmp")
        try:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.link(src, tmp)
            os.replace(tmp, dst)
        except OSError:  # another device, a filesystem without hard links: copy instead
            if os.path.lexists(tmp):
                os.unlink(tmp)
            return False
        self.counts["linked"] += 1
        return True


def dataset_info(prefix: str = "octomed") -> dict[str, Any]:
    """LLaMA-Factory ``dataset_info.json``: ``<prefix>_<split>`` for the split folders next to it
    (every row, images column: vision models) and ``<prefix>_text_<split>`` for ``text/<split>``
    (text rows only, no images column: text-only models, which refuse any image input).

    The folders are registered as ``script_url``, not ``file_name``: for a ``file_name`` folder
    LLaMA-Factory hands *every* directory entry to ``load_dataset`` and stops with "File types
    should be identical" at the storage layer's ``_manifest/`` folder. ``script_url`` makes it
    call ``load_dataset(<folder>)``, whose file discovery reads the Parquet shards only. Relative
    image paths resolve against ``media_dir``, which defaults to this folder (``dataset_dir``).
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
    text = entry | {"columns": {"messages": "messages"}}
    return {f"{prefix}_{split}": {"script_url": split, "split": "train", **entry} for split in SPLITS} | {
        f"{prefix}_text_{split}": {"script_url": f"{LLAMAFACTORY_TEXT_DIR}/{split}", "split": "train", **text}
        for split in SPLITS
    }


IMAGES_REFERENCED = (
    "the run's content-addressed image store, referenced by URI (path; bytes null): read it where the "
    "run's store is reachable, or export with embed_images for a self-contained copy"
)
IMAGES_EMBEDDED = "PNG bytes embedded in the rows (a self-contained copy)"


def trl_dataset_info(rows: Mapping[str, Mapping[str, int]], *, embed_images: bool = False) -> dict[str, Any]:
    """Which TRL configuration is for which model (``OUT/trl/dataset_info.json``)."""
    return {
        "text": {
            "model": "text-only (a VLM can use it too)",
            "form": "TRL conversational language modelling: messages [{role, content: str}], no images column",
            "rows": "rows without images (image rows are only in 'vision')",
            "splits": {s: f"text/{s}" for s in SPLITS},
            "num_rows": dict(rows.get("trl_text", {})),
        },
        "vision": {
            "model": "vision-language (e.g. Qwen2.5-VL)",
            "form": "TRL conversational vision: messages [{role, content: [{type, text}]}] with one "
            "{type: image} part per image, images [HF Image]",
            "rows": "every row (text rows have no image)",
            "images": IMAGES_EMBEDDED if embed_images else IMAGES_REFERENCED,
            "splits": {s: f"vision/{s}" for s in SPLITS},
            "num_rows": dict(rows.get("trl", {})),
        },
    }


def trl_card(*, embed_images: bool = False) -> str:
    """A dataset card whose YAML lets ``datasets.load_dataset(OUT/trl, config)`` find the shards."""
    lines = ["---", "configs:"]
    for config in TRL_CONFIGS:
        lines += [f"- config_name: {config}", "  data_files:"]
        for split in SPLITS:
            lines += [f"  - split: {split}", f"    path: {config}/{split}/*.parquet"]
    lines += [
        "---",
        "",
        "# OctoMed SFT export (TRL)",
        "",
        "- `text`: text rows in TRL's conversational language-modelling form (string `content`, no",
        "  `images` column): for text-only models.",
        "- `vision`: every row in TRL's conversational vision form (typed content parts, `images`):",
        "  for vision-language models. Images: "
        + (IMAGES_EMBEDDED if embed_images else IMAGES_REFERENCED)
        + ".",
        "",
        "`datasets.load_dataset(<this folder>, 'text', split='train')`; see `dataset_info.json` and `export.json`.",
        "",
    ]
    return "\n".join(lines)


def llamafactory_image(image: Mapping[str, Any], bundle: ImageBundle, mode: str) -> str:
    if mode == "relative":
        return bundle.path_for(image)
    uri = image["uri"]
    if storage.protocol_of(uri) != "file":
        raise ConfigError(
            f"llamafactory_images='absolute' needs images on a local/shared filesystem; {uri} is not "
            "(LLaMA-Factory opens image paths as local files): use 'relative'"
        )
    return uri.removeprefix("file://")
