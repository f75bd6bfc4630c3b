"""SFT data: the TRL conversational export -> token ids with loss only on assistant tokens.

Rows come from the export (``messages``: [{role, content}], ``images``: [uri]). Content is a
string or a list of typed parts ({"type": "text", "text": ...} / {"type": "image"}). With string
content and images, the images go before the text of the first user turn (TRL's convention).

Assistant spans are found by rendering the chat template on growing prefixes of the
conversation, so any prefix-stable template works (the tiny model's and Qwen2.5's own), and
tokens are labelled by their character offsets: labels are the token ids inside assistant turns
(including the closing ``<|im_end|>``, so the model learns to stop) and -100 everywhere else.

Images are not decoded here: each image is one ``<|image_pad|>`` while encoding; the collator
loads it from its URI, runs the image processor and expands the pad to the image's patch count.
That keeps the tokenised cache small and image bytes out of memory until a batch needs them.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.schema import RecordError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
IMAGE_TOKEN = "<image>"  # LLaMA-Factory's placeholder in sharegpt text


# --------------------------------------------------------------------------- data files


@dataclass(frozen=True)
class DataFile:
    """One Parquet file of the training export, as recorded in checkpoint.json."""

    uri: str
    rows: int


def resolve_data_files(uris: Sequence[str]) -> list[DataFile]:
    """Expand export URIs into Parquet files with row counts.

    A dataset folder with a manifest gives its committed shards (never a half-written one); a
    plain folder gives its ``*.parquet``; a ``.parquet`` URI is taken as is. Row counts come
    from the manifest or the Parquet footer, so nothing is read beyond metadata.
    """
    files: list[DataFile] = []
    for uri in uris:
        if uri.endswith(".parquet"):
            if not storage.exists(uri):
                raise ConfigError(f"data file not found: {uri}")
            files.append(DataFile(uri, _parquet_rows(uri)))
            continue
        ds = storage.Dataset(uri)
        manifest = ds.manifest()
        if manifest:
            files.extend(DataFile(storage.join(uri, s.file), s.rows) for s in manifest.values())
            continue
        fs, path = storage.filesystem(uri)
        try:
            found = sorted(fs.glob(path.rstrip("/") + "/*.parquet"))
        except Exception as exc:  # unreachable endpoint, no credentials
            raise ConfigError(storage.describe_error(uri, exc)) from None
        if not found:
            raise ConfigError(f"no Parquet files (and no manifest) at {uri}")
        for p in found:
            file_uri = storage.to_uri(fs, p)
            files.append(DataFile(file_uri, _parquet_rows(file_uri)))
    protocols = {storage.protocol_of(f.uri) for f in files}
    if len(protocols) > 1:
        # datasets.load_dataset takes one set of storage options for all files.
        raise ConfigError(f"data files mix storage protocols {sorted(protocols)}; use one store")
    return files


def _parquet_rows(uri: str) -> int:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as fh:
        return pq.ParquetFile(fh).metadata.num_rows


def check_columns(files: Sequence[DataFile]) -> None:
    """Fail early when the files are not the conversational export."""
    fs, path = storage.filesystem(files[0].uri)
    with fs.open(path, "rb") as fh:
        names = pq.ParquetFile(fh).schema_arrow.names
    if "messages" not in names:
        raise ConfigError(
            f"{files[0].uri} is not a conversational export: no 'messages' column (columns: {names})"
        )


def count_rows_with_images(files: Sequence[DataFile]) -> int:
    """How many rows carry at least one image (reads only the ``images`` column, row group by row group)."""
    total = 0
    for f in files:
        fs, path = storage.filesystem(f.uri)
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            if "images" not in pf.schema_arrow.names:
                continue
            for batch in pf.iter_batches(columns=["images"], batch_size=65536):
                lengths = pc.list_value_length(batch.column(0)).fill_null(0)
                total += int(pc.sum(pc.greater(lengths, 0)).as_py() or 0)
    return total


def refuse_secrets(files: Sequence[DataFile], env_names: Sequence[str]) -> None:
    """One ConfigError when a row of the export holds the value of an API key variable in
    ``env_names`` (the teachers' keys): a reflected key is never trained into a model.

    Every column but the image bytes is scanned, batch by batch, with the release's
    :class:`~octomed_data.release_safety.SecretGuard`.
    """
    from octomed_data.release_safety import SecretGuard

    guard = SecretGuard.from_env(env_names)
    if not guard.secrets:
        return
    for f in files:
        fs, path = storage.filesystem(f.uri)
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            columns = [n for n in pf.schema_arrow.names if n != "images"]
            first = 0
            for batch in pf.iter_batches(columns=columns, batch_size=4096):
                text = "\n".join(map(str, batch.to_pylist()))
                try:
                    guard.check(text, f"training data {f.uri} (rows {first}-{first + batch.num_rows - 1})")
                except ConfigError as exc:
                    reason = str(exc).split(";")[0]
                    raise ConfigError(f"{reason}; nothing trained (scrub the key and export again)") from None
                first += batch.num_rows


# --------------------------------------------------------------------------- conversations


def normalize_messages(messages: Any, num_images: int) -> list[dict[str, Any]]:
    """Validate one conversation and put its images in place; raises :class:`RecordError`."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except ValueError:
            raise RecordError("bad_messages", "messages is a string that is not JSON") from None
    if not isinstance(messages, Sequence) or not messages:
        raise RecordError("bad_messages", "messages is empty or not a list")
    out: list[dict[str, Any]] = []
    image_parts = 0
    for m in messages:
        if not isinstance(m, Mapping) or m.get("role") not in ROLES:
            raise RecordError("bad_role", f"message without a role in {ROLES}")
        content = m.get("content")
        if isinstance(content, str):
            if IMAGE_TOKEN in content:
                # LLaMA-Factory sharegpt: "<image>" marks where each image goes.
                pieces = content.split(IMAGE_TOKEN)
                parts = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
                for piece in pieces[1:]:
                    parts.append({"type": "image"})
                    image_parts += 1
                    if piece:
                        parts.append({"type": "text", "text": piece})
                out.append({"role": m["role"], "content": parts})
            else:
                out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, Sequence):
            raise RecordError("bad_content", f"{m['role']} content is neither text nor a list of parts")
        parts = []
        for p in content:
            kind = p.get("type") if isinstance(p, Mapping) else None
            if kind == "image":
                parts.append({"type": "image"})
                image_parts += 1
            elif kind == "text":
                parts.append({"type": "text", "text": p.get("text") or ""})
            else:
                raise RecordError("bad_content", f"unknown content part type {kind!r}")
        out.append({"role": m["role"], "content": parts})
    assistant = [m for m in out if m["role"] == "assistant"]
    if not assistant or not any(_text_of(m["content"]).strip() for m in assistant):
        raise RecordError("no_assistant_turn", "no non-empty assistant message to learn from")
    first_non_system = next((m for m in out if m["role"] != "system"), None)
    if first_non_system is None or first_non_system["role"] != "user":
        raise RecordError("bad_turn_order", "the conversation must start with a user turn")
    if image_parts == 0 and num_images > 0:
        user = first_non_system
        text = user["content"] if isinstance(user["content"], str) else None
        parts = [{"type": "image"}] * num_images
        user["content"] = parts + ([{"type": "text", "text": text}] if text is not None else user["content"])
    elif image_parts != num_images:
        raise RecordError("image_count_mismatch", f"{image_parts} image parts for {num_images} images")
    return out


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text") or "" for p in content if p.get("type") == "text")


@dataclass
class Encoded:
    """One tokenised conversation."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def encode_conversation(
    tokenizer: Any, messages: list[dict[str, Any]], max_seq_len: int | None = None
) -> Encoded:
    """Tokenise a normalised conversation; labels are -100 outside assistant turns.

    Too long: truncated to ``max_seq_len`` (flagged), unless nothing learnable would be left,
    in which case :class:`RecordError` ``too_long`` is raised.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(before) or not full.startswith(upto) or len(upto) < len(before):
            raise ConfigError(
                "the tokenizer's chat template is not prefix-stable (rendering a conversation prefix "
                "does not give a prefix of the full rendering); assistant-only loss cannot be located"
            )
        # The trailing newline after <|im_end|> is template glue, not something to learn.
        spans.append((len(before), len(upto.rstrip())))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    span_idx = 0
    for t, (start, _end) in enumerate(enc["offset_mapping"]):
        while span_idx < len(spans) and start >= spans[span_idx][1]:
            span_idx += 1
        if span_idx < len(spans) and spans[span_idx][0] <= start < spans[span_idx][1]:
            labels[t] = ids[t]
    truncated = False
    if max_seq_len is not None and len(ids) > max_seq_len:
        ids, labels, truncated = ids[:max_seq_len], labels[:max_seq_len], True
    if all(label == IGNORE_INDEX for label in labels):
        raise RecordError("too_long", f"no assistant token within max_seq_len={max_seq_len}")
    return Encoded(ids, labels, truncated)


def image_ref(image: Any) -> dict[str, Any]:
    """One image of an export row as ``{bytes, path}``: a URI string (LLaMA-Factory export) or an
    undecoded HF ``Image`` value (TRL export, bytes usually embedded)."""
    if isinstance(image, str):
        return {"bytes": None, "path": image}
    if isinstance(image, Mapping) and (image.get("bytes") or image.get("path")):
        return {"bytes": image.get("bytes"), "path": image.get("path")}
    raise RecordError("bad_image", f"image is neither a URI nor {{bytes, path}}: {type(image).__name__}")


def encoded_features():
    """Fixed output types of :class:`RowEncoder` (type inference fails on all-empty image lists)."""
    import datasets

    return datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            "images": datasets.List({"bytes": datasets.Value("binary"), "path": datasets.Value("string")}),
            "truncated": datasets.Value("bool"),
            "encode_error": datasets.Value("string"),
        }
    )


class RowEncoder:
    """``datasets.map`` function: export row -> input_ids/labels/images/encode_error.

    Malformed rows are not raised (a crash would stop the run) but marked with a reason in
    ``encode_error``; the trainer filters them out and counts them per reason.
    """

    def __init__(self, tokenizer: Any, max_seq_len: int, multimodal: bool) -> None:
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.multimodal = multimodal

    def __call__(self, row: Mapping[str, Any]) -> dict[str, Any]:
        images = [image_ref(im) for im in (row.get("images") or [])]
        try:
            if images and not self.multimodal:
                raise RecordError("images_for_text_model", "row has images but the model is text-only")
            messages = normalize_messages(row.get("messages"), len(images))
            # Images are expanded to many tokens later: don't truncate inside them here.
            limit = None if images else self.max_seq_len
            enc = encode_conversation(self.tokenizer, messages, limit)
            return {
                "input_ids": enc.input_ids,
                "labels": enc.labels,
                "images": images,
                "truncated": enc.truncated,
                "encode_error": None,
            }
        except RecordError as exc:
            return {
                "input_ids": [],
                "labels": [],
                "images": [],
                "truncated": False,
                "encode_error": exc.reason,
            }


# --------------------------------------------------------------------------- batches


@dataclass
class SFTCollator:
    """Pads a batch (right padding; labels padded with -100); loads and patches images for VL models."""

    pad_token_id: int
    max_seq_len: int
    image_processor: Any = None  # Qwen2-VL image processor for multimodal models
    image_token_id: int | None = None
    max_pixels: int = 262144

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        pixel_values, grids = [], []
        rows: list[tuple[list[int], list[int]]] = []
        for f in features:
            ids, labels = list(f["input_ids"]), list(f["labels"])
            images = f.get("images") or []
            if images:
                if self.image_processor is None:
                    raise ConfigError("a training row has images but the model has no image processor")
                pv, grid, ids, labels = self._expand_images(ids, labels, images)
                pixel_values.append(pv)
                grids.append(grid)
            rows.append((ids[: self.max_seq_len], labels[: self.max_seq_len]))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        label_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, labels) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            label_t[i, : len(labels)] = torch.tensor(labels, dtype=torch.long)
            mask[i, : len(ids)] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "labels": label_t, "attention_mask": mask}
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values, dim=0)
            batch["image_grid_thw"] = torch.cat(grids, dim=0)
            # Without the token types Qwen2.5-VL cannot locate the images and silently falls
            # back to 1-D positions for them instead of its 3-D (mrope) positions.
            batch["mm_token_type_ids"] = (input_ids == self.image_token_id).to(torch.int32)
        return batch

    def _expand_images(self, ids: list[int], labels: list[int], refs: list[dict[str, Any]]):
        return expand_images(  # shared with the packed collator
            ids, labels, refs, self.image_processor, self.image_token_id, self.max_pixels, self.max_seq_len
        )


def load_image(ref: Mapping[str, Any]) -> Any:
    """Decode one ``{bytes, path}`` image reference to RGB (bytes first: the export embeds them)."""
    from PIL import Image

    data = ref.get("bytes") or storage.read_bytes(ref["path"])
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def expand_images(
    ids: list[int],
    labels: list[int],
    refs: Sequence[Mapping[str, Any]],
    image_processor: Any,
    image_token_id: int | None,
    max_pixels: int,
    max_seq_len: int,
):
    """Load and patch a row's images; expand each ``<|image_pad|>`` to its patch count.

    Returns ``(pixel_values, image_grid_thw, ids, labels)``; image tokens are never learned.
    Used by the padded :class:`SFTCollator` and by the packed collator (:mod:`training.packing`).
    """
    images = [fit_pixels(load_image(ref), max_pixels) for ref in refs]
    out = image_processor(images=images, return_tensors="pt")
    grid = out["image_grid_thw"]
    merge = getattr(image_processor, "merge_size", 2) or 2
    counts = [int(g.prod()) // (merge * merge) for g in grid]
    positions = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(positions) != len(counts):
        raise ConfigError(f"{len(positions)} image tokens in the text for {len(counts)} images")
    new_ids: list[int] = []
    new_labels: list[int] = []
    prev = 0
    for pos, n in zip(positions, counts, strict=True):
        new_ids += ids[prev:pos] + [image_token_id] * n
        new_labels += labels[prev:pos] + [IGNORE_INDEX] * n
        prev = pos + 1
    new_ids += ids[prev:]
    new_labels += labels[prev:]
    # Truncation may only cut text after the last image: cutting through image tokens
    # would desynchronise the text from the patches.
    last_image = len(new_ids) - 1 - new_ids[::-1].index(image_token_id)
    if last_image >= max_seq_len:
        raise ConfigError(
            f"a training row needs {last_image + 1} tokens up to its last image, more than "
            f"max_seq_len={max_seq_len}; raise max_seq_len or lower max_pixels"
        )
    return out["pixel_values"], grid, new_ids, new_labels


def fit_pixels(image: Any, max_pixels: int) -> Any:
    """Downscale (keeping aspect) so that width*height <= max_pixels."""
    size = fitted_size(*image.size, max_pixels)
    return image if size == image.size else image.resize(size)


def fitted_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The (width, height) :func:`fit_pixels` resizes an image to; pure, so packing can predict
    image token counts from the image header alone."""
    if width * height <= max_pixels:
        return width, height
    scale = (max_pixels / (width * height)) ** 0.5
    return max(28, int(width * scale)), max(28, int(height * scale))
