"""Sequence packing for SFT: several examples per row of ``max_seq_len`` tokens, none attending to another.

Reasoning traces vary from a few hundred to many thousand tokens, so padding each micro-batch
to its longest example wastes most of the compute. Packing concatenates examples into rows:

* **Which examples share a row** is decided up front, from each example's token count, by a
  deterministic best-fit-decreasing bin packing over windows of ``window`` examples taken in a
  seeded random order (:func:`pack_examples`). Same data + seed -> same packs, so a resumed run
  sees the same order. Every example lands in exactly one pack.
* **Isolation**: each example's position ids restart at 0 and no attention mask is passed.
  transformers (``masking_utils.find_packed_sequence_indices``) then builds a block-diagonal
  causal mask for sdpa/eager, and flash-attention takes its varlen (``cu_seqlens``) path from
  the same position ids, which needs a batch of one row: :class:`~training.packed_collator.PackedCollator` ``flatten``.
* **Qwen2.5-VL** takes position ids of shape (4, B, L): row 0 the text positions (used for the
  packed mask), rows 1-3 the 3-D mrope positions, computed per example exactly as
  ``Qwen2_5_VLModel.get_rope_index`` would for that example alone (:func:`~training.packed_collator.mrope_positions`).
  Image tokens are expanded by the collator; their count is predicted here from the image
  header (:func:`image_token_count`) so the packer knows each example's length beforehand.
* **Labels** stay -100 outside assistant turns and are also -100 at each example's first token,
  so nothing is predicted across a boundary.
* **Global batch**: ``global_batch_size`` counts examples; :func:`packed_batch_plan` turns it
  into packs per optimizer step from the measured mean examples per pack.
"""

from __future__ import annotations

import bisect
import io
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc

from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.schema import RecordError
from training.data import IGNORE_INDEX, fitted_size
from training.packed_collator import PackedCollator

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- bin packing


@dataclass(frozen=True)
class Packing:
    """Examples grouped into packs: pack ``i`` is ``order[bounds[i]:bounds[i + 1]]``.

    Two flat integer arrays instead of a list of lists: a million examples cost ~16 MB.
    """

    order: np.ndarray  # example indices, pack after pack
    bounds: np.ndarray  # len(packs) + 1 offsets into ``order``
    tokens: np.ndarray  # tokens per pack
    capacity: int

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def pack(self, i: int) -> list[int]:
        """Example indices of pack ``i``."""
        return self.order[self.bounds[i] : self.bounds[i + 1]].tolist()

    @property
    def num_examples(self) -> int:
        return len(self.order)

    @property
    def mean_examples_per_pack(self) -> float:
        return self.num_examples / max(1, len(self))

    @property
    def fill(self) -> float:
        """Fraction of the ``len(self) * capacity`` token slots holding a real token."""
        return float(self.tokens.sum()) / max(1, len(self) * self.capacity)

    def stats(self) -> dict[str, Any]:
        """What the packing did, for logs and checkpoint.json."""
        return {
            "examples": self.num_examples,
            "packs": len(self),
            "mean_examples_per_pack": round(self.mean_examples_per_pack, 4),
            "fill": round(self.fill, 4),
            "capacity": self.capacity,
        }


def best_fit_decreasing(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Pack items (positions into ``lengths``) into bins of ``capacity``: longest first, each into
    the fullest bin it still fits (best fit), else a new bin. Deterministic; O(n log n).
    """
    lengths = np.asarray(lengths)
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"an item of {int(lengths.max())} tokens exceeds the capacity {capacity}")
    # Stable sort on -length: ties keep their (seeded) input order, so the result is reproducible.
    items = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), sorted
    for item in items.tolist():
        size = int(lengths[item])
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            remaining, b = free.pop(at)
        else:
            remaining, b = capacity, len(bins)
            bins.append([])
        bins[b].append(item)
        remaining -= size
        if remaining > 0:
            bisect.insort(free, (remaining, b))
    return bins


def pack_examples(lengths: Sequence[int] | np.ndarray, capacity: int, *, seed: int, window: int) -> Packing:
    """Deterministic packing of examples with token counts ``lengths`` into rows of ``capacity``.

    Examples are visited in a seeded random order, ``window`` at a time; each window is packed
    best-fit-decreasing and its packs are emitted in a seeded random order (otherwise packs
    would come longest-first). A bounded window keeps examples from all over the data mixed
    within packs and is what a streaming run can afford; a larger window packs tighter.
    """
    if window < 1:
        raise ConfigError(f"packing window must be >= 1, got {window}")
    lengths = np.asarray(lengths, dtype=np.int64)
    rng = np.random.default_rng(seed)
    visit = rng.permutation(len(lengths))
    order: list[np.ndarray] = []
    bounds = [0]
    tokens: list[int] = []
    for start in range(0, len(visit), window):
        chunk = visit[start : start + window]
        bins = best_fit_decreasing(lengths[chunk], capacity)
        for b in rng.permutation(len(bins)).tolist():
            members = chunk[bins[b]]
            order.append(members)
            bounds.append(bounds[-1] + len(members))
            tokens.append(int(lengths[members].sum()))
    return Packing(
        order=np.concatenate(order) if order else np.zeros(0, dtype=np.int64),
        bounds=np.asarray(bounds, dtype=np.int64),
        tokens=np.asarray(tokens, dtype=np.int64),
        capacity=capacity,
    )


# --------------------------------------------------------------------------- global batch


@dataclass(frozen=True)
class PackedBatchPlan:
    """How many packs one optimizer step takes so that it sees about ``global_batch_size`` examples."""

    global_batch_size: int  # examples wanted per optimizer step (the paper's 512)
    per_device_batch_size: int  # packs per device per micro-batch
    gradient_accumulation_steps: int
    world_size: int
    packs_per_step: int
    mean_examples_per_pack: float
    examples_per_step: float  # expected examples per optimizer step (packs_per_step * mean)


def packed_batch_plan(
    global_batch_size: int, mean_examples_per_pack: float, per_device_batch_size: int, world_size: int
) -> PackedBatchPlan:
    """Packs per optimizer step for a global batch counted in examples.

    ``global_batch_size / mean_examples_per_pack`` packs, rounded to the nearest multiple of
    ``per_device_batch_size * world_size`` (at least one pack per device). Pure: the batch-plan
    code calls it with the mean measured by :func:`pack_examples`.
    """
    if global_batch_size < 1 or per_device_batch_size < 1 or world_size < 1:
        raise ConfigError("global_batch_size, per_device_batch_size and world_size must be >= 1")
    if not mean_examples_per_pack > 0:
        raise ConfigError(f"mean examples per pack must be > 0, got {mean_examples_per_pack}")
    unit = per_device_batch_size * world_size
    accumulation = max(1, round(global_batch_size / mean_examples_per_pack / unit))
    packs = accumulation * unit
    return PackedBatchPlan(
        global_batch_size=global_batch_size,
        per_device_batch_size=per_device_batch_size,
        gradient_accumulation_steps=accumulation,
        world_size=world_size,
        packs_per_step=packs,
        mean_examples_per_pack=mean_examples_per_pack,
        examples_per_step=round(packs * mean_examples_per_pack, 2),
    )


# --------------------------------------------------------------------------- example lengths


def image_size(ref: Mapping[str, Any]) -> tuple[int, int]:
    """(width, height) of one ``{bytes, path}`` image from its header only (PIL opens lazily)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if ref.get("bytes"):
            with Image.open(io.BytesIO(ref["bytes"])) as im:
                return im.size
        fs, path = storage.filesystem(ref["path"])
        with fs.open(path, "rb") as fh, Image.open(fh) as im:
            return im.size
    except FileNotFoundError:
        raise RecordError("image_not_found", f"image not found: {ref.get('path')}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise RecordError("bad_image", f"unreadable image {ref.get('path')}: {exc}") from None


def image_token_count(width: int, height: int, image_processor: Any, max_pixels: int) -> int:
    """How many ``<|image_pad|>`` tokens the collator will expand one image of this size to.

    The same two resizes as the collator: :func:`training.data.fitted_size` to ``max_pixels``,
    then the processor's ``smart_resize`` (via its ``get_number_of_image_patches``), then
    ``merge_size**2`` patches per token.
    """
    w, h = fitted_size(width, height, max_pixels)
    merge = getattr(image_processor, "merge_size", 2) or 2
    try:
        patches = image_processor.get_number_of_image_patches(h, w)
    except ValueError as exc:  # aspect ratio beyond 200: the processor refuses it too
        raise RecordError("bad_image", str(exc)) from None
    return int(patches) // (merge * merge)


@dataclass
class LengthModel:
    """Predicts each encoded example's token count after image expansion and truncation."""

    max_seq_len: int
    image_processor: Any = None
    image_token_id: int | None = None
    max_pixels: int = 262144

    def __call__(self, input_ids: Sequence[int], labels: Sequence[int], images: Sequence[Mapping]) -> int:
        """Tokens the collator will produce for this example; :class:`RecordError` if it can't fit."""
        if not images:
            return min(len(input_ids), self.max_seq_len)  # text rows were truncated when encoded
        if self.image_processor is None:
            raise RecordError("images_for_text_model", "row has images but the model has no image processor")
        counts = [
            image_token_count(*image_size(ref), self.image_processor, self.max_pixels) for ref in images
        ]
        positions = [i for i, t in enumerate(input_ids) if t == self.image_token_id]
        if len(positions) != len(counts):
            raise RecordError(
                "image_count_mismatch", f"{len(positions)} image tokens for {len(counts)} images"
            )
        extra = sum(counts) - len(counts)
        total = len(input_ids) + extra
        last_image_end = positions[-1] + extra + 1
        if last_image_end > self.max_seq_len:
            raise RecordError(
                "image_exceeds_max_seq_len",
                f"{last_image_end} tokens up to the last image > max_seq_len={self.max_seq_len}",
            )
        if total > self.max_seq_len:
            # The collator keeps text only up to max_seq_len: something learnable must remain.
            keep = self.max_seq_len - extra
            if all(label == IGNORE_INDEX for label in labels[:keep]):
                raise RecordError("too_long", f"no assistant token within max_seq_len={self.max_seq_len}")
        return min(total, self.max_seq_len)


def example_lengths(
    dataset: Any, length_model: LengthModel, batch_size: int = 4096
) -> tuple[np.ndarray, Counter]:
    """Token count of every example of an encoded ``datasets.Dataset`` (streamed in Arrow batches).

    Text rows cost nothing but their list lengths; only rows with images are read in Python
    (for their image headers). Rows that can't be trained on (missing or unreadable image, an
    image beyond ``max_seq_len``) get length 0 and are counted by reason; the caller leaves them out.
    """
    lengths = np.zeros(len(dataset), dtype=np.int64)
    errors: Counter = Counter()
    columns = ["input_ids", "labels", "images"]
    start = 0
    for table in dataset.select_columns(columns).with_format("arrow").iter(batch_size=batch_size):
        n = table.num_rows
        token_counts = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
        lengths[start : start + n] = np.minimum(token_counts, length_model.max_seq_len)
        image_counts = (
            pc.list_value_length(table.column("images")).fill_null(0).to_numpy(zero_copy_only=False)
        )
        for i in np.flatnonzero(image_counts > 0).tolist():
            row = table.slice(i, 1).to_pylist()[0]
            try:
                lengths[start + i] = length_model(row["input_ids"], row["labels"], row["images"])
            except RecordError as exc:
                lengths[start + i] = 0
                errors[exc.reason] += 1
        start += n
    return lengths, errors


# --------------------------------------------------------------------------- datasets


class PackedDataset:
    """Map-style dataset of packs over an encoded ``datasets.Dataset``; item ``i`` = pack ``i``.

    ``index`` maps the packing's example indices to rows of ``examples`` (rows left out of the
    packing, e.g. with an unreadable image, are simply never referenced).
    """

    def __init__(self, examples: Any, packing: Packing, index: np.ndarray | None = None) -> None:
        self.examples = examples
        self.packing = packing
        self.index = index

    def __len__(self) -> int:
        return len(self.packing)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rows = self.packing.pack(i)
        if self.index is not None:
            rows = self.index[rows].tolist()
        batch = self.examples[rows]
        keys = list(batch)
        return {"examples": [{k: batch[k][j] for k in keys} for j in range(len(rows))]}


def iter_packs(
    examples: Iterable[Mapping[str, Any]],
    length_of: Callable[[Mapping[str, Any]], int],
    capacity: int,
    *,
    seed: int,
    window: int,
    errors: Counter | None = None,
) -> Iterator[list[Mapping[str, Any]]]:
    """Streaming packing: buffer ``window`` examples, pack them best-fit-decreasing, yield packs.

    Memory is bounded by the window. ``length_of`` raising :class:`RecordError` skips that
    example and counts it in ``errors``.
    """
    rng = np.random.default_rng(seed)
    buffer: list[Mapping[str, Any]] = []
    sizes: list[int] = []

    def flush() -> Iterator[list[Mapping[str, Any]]]:
        bins = best_fit_decreasing(sizes, capacity)
        for b in rng.permutation(len(bins)).tolist():
            yield [buffer[j] for j in bins[b]]

    for ex in examples:
        try:
            size = length_of(ex)
        except RecordError as exc:
            if errors is not None:
                errors[exc.reason] += 1
            continue
        buffer.append(ex)
        sizes.append(size)
        if len(buffer) >= window:
            yield from flush()
            buffer, sizes = [], []
    if buffer:
        yield from flush()


def streaming_packed_dataset(source: Any, length_model: LengthModel, *, seed: int, window: int) -> Any:
    """A torch ``IterableDataset`` of packs over a streaming ``datasets.IterableDataset``.

    ``errors`` on the returned object counts skipped examples by reason, as they stream past.
    Each epoch re-seeds the pack order (``set_epoch``), like ``datasets``' own shuffle.
    """
    import torch.utils.data

    class StreamingPacks(torch.utils.data.IterableDataset):
        def __init__(self) -> None:
            self.source = source
            self.errors: Counter = Counter()
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch
            if hasattr(self.source, "set_epoch"):
                self.source.set_epoch(epoch)

        def __iter__(self) -> Iterator[dict[str, Any]]:
            def length_of(ex: Mapping[str, Any]) -> int:
                return length_model(ex["input_ids"], ex["labels"], ex.get("images") or [])

            packs = iter_packs(
                self.source,
                length_of,
                length_model.max_seq_len,
                seed=seed + self.epoch,
                window=window,
                errors=self.errors,
            )
            for pack in packs:
                yield {"examples": pack}

    return StreamingPacks()


def measure_stream(source: Any, length_model: LengthModel, *, seed: int, window: int) -> Packing:
    """Pack the first ``window`` examples of a stream, to estimate examples per pack up front."""
    sizes: list[int] = []
    for ex in itertools.islice(iter(source), window):
        try:
            sizes.append(length_model(ex["input_ids"], ex["labels"], ex.get("images") or []))
        except RecordError:
            continue
    if not sizes:
        raise ConfigError(f"no usable training rows among the first {window} of the stream")
    return pack_examples(sizes, length_model.max_seq_len, seed=seed, window=window)


# --------------------------------------------------------------------------- one call for train()


@dataclass
class PackedData:
    """What :func:`build_packed_data` hands to the trainer."""

    dataset: Any  # PackedDataset (map-style) or a torch IterableDataset of packs (streaming)
    collator: PackedCollator
    plan: PackedBatchPlan
    errors: Counter  # examples left out, by reason (streaming: grows while training)
    info: dict[str, Any]  # for logs, TrainResult and checkpoint.json


def build_packed_data(
    config: Any,
    train_ds: Any,
    *,
    model_config: Any,
    pad_token_id: int,
    image_processor: Any,
    world_size: int,
) -> PackedData:
    """Pack the encoded dataset of ``config`` (a ``TrainConfig``) and plan the packed global batch."""
    image_token_id = getattr(model_config, "image_token_id", None)
    length_model = LengthModel(config.max_seq_len, image_processor, image_token_id, config.max_pixels)
    if config.streaming:
        measured = measure_stream(train_ds, length_model, seed=config.seed, window=config.packing_window)
        dataset = streaming_packed_dataset(
            train_ds, length_model, seed=config.seed, window=config.packing_window
        )
        errors = dataset.errors
        info = {"mode": "streaming", "measured_on_first": measured.stats()}
    else:
        lengths, errors = example_lengths(train_ds, length_model)
        usable = np.flatnonzero(lengths > 0)
        if len(usable) == 0:
            raise ConfigError(f"no usable training rows for packing ({dict(errors)})")
        measured = pack_examples(
            lengths[usable], config.max_seq_len, seed=config.seed, window=config.packing_window
        )
        dataset = PackedDataset(train_ds, measured, index=usable)
        info = {"mode": "map", **measured.stats()}
    plan = packed_batch_plan(
        config.global_batch_size, measured.mean_examples_per_pack, config.per_device_batch_size, world_size
    )
    vision_config = getattr(model_config, "vision_config", None)
    attn = str(getattr(model_config, "_attn_implementation", "") or "")
    collator = PackedCollator(
        pad_token_id=pad_token_id,
        max_seq_len=config.max_seq_len,
        image_processor=image_processor,
        image_token_id=image_token_id,
        max_pixels=config.max_pixels,
        mrope=vision_config is not None,
        spatial_merge_size=getattr(vision_config, "spatial_merge_size", 2),
        # flash-attention only takes the varlen path for a batch of one row.
        flatten=attn.startswith("flash"),
    )
    info.update(
        {
            "window": config.packing_window,
            "attn_implementation": attn,
            "flatten": collator.flatten,
            "packs_per_step": plan.packs_per_step,
            "gradient_accumulation_steps": plan.gradient_accumulation_steps,
            "examples_per_step": plan.examples_per_step,
        }
    )
    log.info(
        "packing: %.2f examples per pack (fill %.3f); %d packs per optimizer step = ~%.0f examples "
        "(global_batch_size %d), gradient accumulation %d",
        measured.mean_examples_per_pack,
        measured.fill,
        plan.packs_per_step,
        plan.examples_per_step,
        config.global_batch_size,
        plan.gradient_accumulation_steps,
    )
    return PackedData(dataset, collator, plan, errors, info)
