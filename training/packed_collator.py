"""Packed rows as model inputs: each example's positions restart at 0 (Qwen2.5-VL: its 3-D mrope
positions, as ``get_rope_index`` computes them for the example alone), labels never cross an
example boundary, images expanded (see :mod:`training.packing`)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from octomed_data.errors import ConfigError
from training.data import IGNORE_INDEX, expand_images

log = logging.getLogger(__name__)


def mrope_positions(
    input_ids: Sequence[int], grids: Sequence[Sequence[int]], image_token_id: int, spatial_merge_size: int
) -> np.ndarray:
    """(3, L) Qwen2.5-VL mrope positions of ONE example, as ``get_rope_index`` computes them alone.

    Text runs count up by one on all three axes; a run of image tokens takes the next grid and
    gets (temporal, height, width) positions offset by the running position, which then advances
    by ``max(h, w) // merge`` (not by the number of image tokens).
    """
    ids = np.asarray(input_ids)
    out = np.zeros((3, len(ids)), dtype=np.int64)
    grid_iter = iter(grids)
    current = 0
    at = 0
    for is_image, run in itertools.groupby(ids.tolist(), key=lambda t: t == image_token_id):
        n = len(list(run))
        if not is_image:
            out[:, at : at + n] = np.arange(current, current + n)
            current += n
        else:
            t, h, w = (int(x) for x in next(grid_iter))
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            block = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + current
            if block.shape[1] != n:
                raise ConfigError(f"{n} image tokens for an image grid of {block.shape[1]} tokens")
            out[:, at : at + n] = block
            current += max(h, w) // spatial_merge_size
        at += n
    return out


@dataclass
class PackedCollator:
    """Packs -> one training batch: rows of concatenated examples, position ids reset per example.

    Output: ``input_ids``, ``labels`` (B, L); ``position_ids`` (B, L), or (4, B, L) for mrope
    models; no ``attention_mask`` (its absence is what makes transformers derive the packed mask);
    ``use_cache=False`` (the packed mask is only derived without a cache); ``num_examples`` (examples in the batch; the trainer pops it before the forward). Rows are
    right-padded with a separate pad segment. ``flatten`` puts the whole micro-batch in one row,
    which flash-attention's varlen path requires.
    """

    pad_token_id: int
    max_seq_len: int
    image_processor: Any = None
    image_token_id: int | None = None
    max_pixels: int = 262144
    mrope: bool = False  # Qwen2(.5)-VL: 3-D positions plus the text row
    spatial_merge_size: int = 2
    flatten: bool = False

    def __call__(self, packs: list[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        rows: list[tuple[list[int], list[int], np.ndarray]] = []
        pixel_values, grids = [], []
        n_examples = 0
        for pack in packs:
            ids_row: list[int] = []
            labels_row: list[int] = []
            pos_parts: list[np.ndarray] = []
            for ex in pack["examples"]:
                ids, labels = list(ex["input_ids"]), list(ex["labels"])
                images = ex.get("images") or []
                grid = None
                if images:
                    if self.image_processor is None:
                        raise ConfigError("a training row has images but the model has no image processor")
                    pv, grid, ids, labels = expand_images(
                        ids, labels, images, self.image_processor, self.image_token_id,
                        self.max_pixels, self.max_seq_len,
                    )  # fmt: skip
                    pixel_values.append(pv)
                    grids.append(grid)
                ids, labels = ids[: self.max_seq_len], labels[: self.max_seq_len]
                # The previous example's last token must not learn to predict this one's first.
                labels[0] = IGNORE_INDEX
                ids_row += ids
                labels_row += labels
                pos_parts.append(self._positions(ids, grid))
                n_examples += 1
            if len(ids_row) > self.max_seq_len:
                raise ConfigError(
                    f"a pack of {len(ids_row)} tokens exceeds max_seq_len={self.max_seq_len}: the predicted "
                    "example lengths disagree with the collator (image processor settings changed?)"
                )
            rows.append((ids_row, labels_row, np.concatenate(pos_parts, axis=1)))
        if self.flatten:
            rows = [
                (
                    sum((r[0] for r in rows), []),
                    sum((r[1] for r in rows), []),
                    np.concatenate([r[2] for r in rows], axis=1),
                )
            ]
        width = max(len(r[0]) for r in rows)
        n_pos = 4 if self.mrope else 1
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        label_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        # Padding is its own segment (positions restart at 0): real tokens never see it (causal,
        # it comes last) and it never sees them.
        positions = torch.arange(width, dtype=torch.long).repeat(n_pos, len(rows), 1)
        for i, (ids, labels, pos) in enumerate(rows):
            n = len(ids)
            input_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
            label_t[i, :n] = torch.tensor(labels, dtype=torch.long)
            positions[:, i, :n] = torch.from_numpy(pos)
            positions[:, i, n:] = torch.arange(width - n, dtype=torch.long)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": label_t,
            "position_ids": positions if self.mrope else positions[0],
            "num_examples": torch.tensor(n_examples, dtype=torch.long),
            # transformers derives the packed mask only without a KV cache; a model whose config
            # says use_cache=True would otherwise build one and silently attend across examples.
            "use_cache": False,
        }
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values, dim=0)
            batch["image_grid_thw"] = torch.cat(grids, dim=0)
        return batch

    def _positions(self, ids: list[int], grid: Any) -> np.ndarray:
        text = np.arange(len(ids), dtype=np.int64)[None, :]
        if not self.mrope:
            return text
        if grid is None:
            spatial = np.repeat(text, 3, axis=0)
        else:
            spatial = mrope_positions(ids, grid.tolist(), self.image_token_id, self.spatial_merge_size)
        return np.concatenate([text, spatial], axis=0)
