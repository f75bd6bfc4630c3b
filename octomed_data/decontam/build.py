"""Building the decontamination index's arrays from a registry table (once per registry).

Sorted 64-bit n-gram hashes with the first item owning each, whole-item hashes of short items with
their option keys, image hashes, the vocabulary: what :class:`~octomed_data.decontam.index.DecontamIndex`
holds (the rules: :mod:`octomed_data.decontam`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from octomed_data.decontam.text import NGRAM, exact_key, rolling_hashes, strip_choices, token_hash, tokens


def index_arrays(table: pa.Table, short_match: str) -> dict[str, Any]:
    """The :class:`~octomed_data.decontam.index.DecontamIndex` arrays of a registry ``table``."""
    benchmark_col = table.column("benchmark").to_pylist()
    item_col = table.column("item_id").to_pylist()
    text_col = table.column("text").to_pylist()
    options_col = table.column("options").to_pylist()
    grounded_col = table.column("image_grounded").to_pylist()
    sha_col = table.column("image_sha256").to_pylist()
    phash_col = table.column("image_phash").to_pylist()

    benchmarks = sorted(set(benchmark_col))
    bench_index = {b: i for i, b in enumerate(benchmarks)}
    item_index: dict[tuple[str, str], int] = {}
    item_benchmark: list[int] = []
    item_ids: list[str] = []

    vocab: dict[str, int] = {}

    def ids_of(toks: list[str]) -> list[int]:
        return [vocab.setdefault(t, len(vocab) + 1) for t in toks]

    ngram_chunks: list[np.ndarray] = []
    ngram_item_chunks: list[np.ndarray] = []
    exact_pending: list[tuple[list[int], list[list[int]] | None, int]] = []
    sha_items: dict[str, int] = {}
    phash_items: dict[int, int] = {}
    for bench, item, text, options, grounded, sha, ph in zip(
        benchmark_col, item_col, text_col, options_col, grounded_col, sha_col, phash_col, strict=True
    ):
        key = (bench, item)
        idx = item_index.get(key)
        if idx is None:
            idx = item_index[key] = len(item_ids)
            item_ids.append(item)
            item_benchmark.append(bench_index[bench])
        if sha and sha not in sha_items:
            sha_items[sha] = idx
        if ph is not None and int(ph) not in phash_items:
            phash_items[int(ph)] = idx
        toks = tokens(strip_choices(text or ""))
        if not toks:
            continue
        ids = ids_of(toks)
        if len(toks) >= NGRAM:
            ngram_chunks.append(np.asarray(ids, dtype=np.int64))
            ngram_item_chunks.append(np.full(len(toks) - NGRAM + 1, idx, dtype=np.int32))
        elif short_match == "text":
            exact_pending.append((ids, None, idx))
        elif not grounded:
            exact_pending.append((ids, [ids_of(tokens(o)) for o in (options or [])], idx))

    vocab_tokens = list(vocab)
    vocab_hashes = np.fromiter((token_hash(t) for t in vocab_tokens), dtype=np.uint64, count=len(vocab))
    values = np.concatenate(([np.uint64(0)], vocab_hashes))

    if ngram_chunks:
        hashes = np.concatenate([rolling_hashes(values[c]) for c in ngram_chunks])
        owners = np.concatenate(ngram_item_chunks)
        # Sort by hash, keep the first item (lowest index) that owns each n-gram.
        order = np.lexsort((owners, hashes))
        hashes, owners = hashes[order], owners[order]
        first = np.concatenate(([True], hashes[1:] != hashes[:-1]))
        ngram_hashes, ngram_items = hashes[first], owners[first]
    else:
        ngram_hashes, ngram_items = np.empty(0, np.uint64), np.empty(0, np.int32)

    exact: dict[tuple[int, tuple[int, ...]], int] = {}
    for ids, option_ids, idx in exact_pending:
        option_keys = tuple(sorted({exact_key(values[o].tolist()) for o in option_ids or [] if o}))
        exact.setdefault((exact_key(values[ids].tolist()), option_keys), idx)
    exact_sorted = sorted(exact.items())
    option_counts = [len(keys) for (_, keys), _ in exact_sorted]

    return {
        "vocab": vocab_tokens,
        "vocab_hashes": vocab_hashes,
        "ngram_hashes": ngram_hashes,
        "ngram_items": ngram_items,
        "exact_hashes": np.array([h for (h, _), _ in exact_sorted], dtype=np.uint64),
        "exact_items": np.array([i for _, i in exact_sorted], dtype=np.int32),
        "exact_option_offsets": np.concatenate(([0], np.cumsum(option_counts, dtype=np.int64))),
        "exact_option_keys": np.array([k for (_, keys), _ in exact_sorted for k in keys], dtype=np.uint64),
        "image_sha256": np.array(list(sha_items), dtype="S64"),
        "image_sha256_items": np.array(list(sha_items.values()), dtype=np.int32),
        "image_phash": np.array(list(phash_items), dtype=np.uint64),
        "image_phash_items": np.array(list(phash_items.values()), dtype=np.int32),
        "item_benchmark": np.array(item_benchmark, dtype=np.int16),
        "benchmarks": benchmarks,
        "item_ids": item_ids,
    }
