"""The decontamination index: the registry's held-out items as compact numpy arrays, and matching.

:class:`DecontamIndex` is built once from the registry pack (sorted 64-bit n-gram hashes,
whole-item hashes, image hashes), saved as one ``.npz`` through the storage layer, and loaded by
shard workers, which never re-read benchmark files. Match kinds are tried as image_sha256,
text_exact, text_ngram, image_phash (the rules: :mod:`octomed_data.decontam`). This module
imports the registry (to build the index); the registry imports only :mod:`.text`, so no circle.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from octomed_data import storage
from octomed_data.decontam.text import (
    NGRAM,
    clean_windows,
    context_of,
    exact_key,
    exact_keys,
    options_required,
    rolling_hashes,
    strip_choices,
    tokens,
)
from octomed_data.errors import OctomedError
from octomed_data.registry import load_registry
from octomed_data.schema import QUESTION_SCHEMA

log = logging.getLogger(__name__)

DEFAULT_PHASH_THRESHOLD = 6
SHORT_MATCH_MODES = ("item", "text")
INDEX_FORMAT = "octomed-decontam-index/1"

# Match kinds, in the order they are tried (most certain first).
IMAGE_SHA256 = "image_sha256"
TEXT_EXACT = "text_exact"
TEXT_NGRAM = "text_ngram"
IMAGE_PHASH = "image_phash"
MATCH_KINDS = (IMAGE_SHA256, TEXT_EXACT, TEXT_NGRAM, IMAGE_PHASH)

_FILTER_BITS = 27


class DecontamError(OctomedError):
    """The decontamination input, registry or index cannot be used."""


@dataclass(frozen=True)
class Match:
    """Why a question was removed: the first benchmark item it matched."""

    kind: str  # image_sha256 | text_exact | text_ngram | image_phash
    benchmark: str
    item_id: str
    detail: str  # the shared n-gram / the equal normalised text / the image hash / the Hamming distance


class DecontamIndex:
    """Everything decontamination needs from the registry, as compact numpy arrays.

    Build with :meth:`from_registry` (once), persist with :meth:`save`, load in shard workers with
    :meth:`load`. ``check_table`` / ``check`` never touch benchmark files.
    """

    def __init__(
        self,
        *,
        vocab: Sequence[str],
        vocab_hashes: np.ndarray,
        ngram_hashes: np.ndarray,
        ngram_items: np.ndarray,
        exact_hashes: np.ndarray,
        exact_items: np.ndarray,
        exact_option_offsets: np.ndarray,
        exact_option_keys: np.ndarray,
        image_sha256: np.ndarray,
        image_sha256_items: np.ndarray,
        image_phash: np.ndarray,
        image_phash_items: np.ndarray,
        item_benchmark: np.ndarray,
        benchmarks: Sequence[str],
        item_ids: Sequence[str],
        short_match: str = "item",
        phash_threshold: int = DEFAULT_PHASH_THRESHOLD,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        if short_match not in SHORT_MATCH_MODES:
            raise DecontamError(f"short_match must be one of {SHORT_MATCH_MODES}, not {short_match!r}")
        self.vocab_tokens = list(vocab)
        # Index 0 = unknown token (hash 0): a window holding one can't be a benchmark n-gram.
        self._vocab = {t: i for i, t in enumerate(self.vocab_tokens, start=1)}
        self.vocab_hashes = np.concatenate(([np.uint64(0)], np.asarray(vocab_hashes, dtype=np.uint64)))
        self.ngram_hashes = np.asarray(ngram_hashes, dtype=np.uint64)
        self.ngram_items = np.asarray(ngram_items, dtype=np.int32)
        # Bit filter over the top 27 hash bits (16 MB): rejects ~99% of non-benchmark windows with
        # one random read, so the binary search (the slow, cache-missing step) runs on ~1% of them.
        bits = (self.ngram_hashes >> np.uint64(64 - _FILTER_BITS)).astype(np.int64)
        self._filter = np.zeros(1 << (_FILTER_BITS - 3), dtype=np.uint8)
        np.bitwise_or.at(self._filter, bits >> 3, np.left_shift(1, bits & 7).astype(np.uint8))
        self.exact_hashes = np.asarray(exact_hashes, dtype=np.uint64)
        self.exact_items = np.asarray(exact_items, dtype=np.int32)
        # Option keys of each short item (CSR: entry i owns keys[offsets[i]:offsets[i+1]]).
        self.exact_option_offsets = np.asarray(exact_option_offsets, dtype=np.int64)
        self.exact_option_keys = np.asarray(exact_option_keys, dtype=np.uint64)
        self.image_sha256 = np.asarray(image_sha256, dtype="S64")
        self.image_sha256_items = np.asarray(image_sha256_items, dtype=np.int32)
        self._sha_lookup = {
            s.decode(): int(i) for s, i in zip(self.image_sha256, self.image_sha256_items, strict=True)
        }
        self.image_phash = np.asarray(image_phash, dtype=np.uint64)
        self.image_phash_items = np.asarray(image_phash_items, dtype=np.int32)
        self.item_benchmark = np.asarray(item_benchmark, dtype=np.int16)
        self.benchmarks = list(benchmarks)
        self.item_ids = list(item_ids)
        self.short_match = short_match
        self.phash_threshold = int(phash_threshold)
        self.meta = dict(meta or {})

    def __repr__(self) -> str:
        return (
            f"DecontamIndex(items={len(self.item_ids)}, ngrams={len(self.ngram_hashes)}, "
            f"exact={len(self.exact_hashes)}, images={len(self.image_phash)}, short_match={self.short_match!r})"
        )

    # ---- construction

    @classmethod
    def from_registry(
        cls,
        registry: pa.Table | str | None = None,
        *,
        short_match: str = "item",
        phash_threshold: int = DEFAULT_PHASH_THRESHOLD,
    ) -> DecontamIndex:
        """Build the index from a registry table or pack path (default: the bundled pack)."""
        table = registry if isinstance(registry, pa.Table) else load_registry(registry)
        if short_match not in SHORT_MATCH_MODES:
            raise DecontamError(f"short_match must be one of {SHORT_MATCH_MODES}, not {short_match!r}")
        from octomed_data.decontam.build import index_arrays  # shard workers load, never build

        started = time.perf_counter()
        index = cls(
            **index_arrays(table, short_match),
            short_match=short_match,
            phash_threshold=phash_threshold,
            meta={
                "registry_rows": table.num_rows,
                "registry": registry if isinstance(registry, str) else None,
                "build_seconds": round(time.perf_counter() - started, 3),
            },
        )
        log.info("built %r in %.2fs", index, time.perf_counter() - started)
        return index

    # ---- persistence

    def nbytes(self) -> int:
        """Bytes held by the numpy arrays (the vocabulary dict and item id strings come on top)."""
        arrays = (
            self.vocab_hashes,
            self.ngram_hashes,
            self.ngram_items,
            self.exact_hashes,
            self.exact_items,
            self.exact_option_offsets,
            self.exact_option_keys,
            self.image_sha256,
            self.image_sha256_items,
            self.image_phash,
            self.image_phash_items,
            self.item_benchmark,
        )
        return int(sum(a.nbytes for a in arrays))

    def to_bytes(self) -> bytes:
        """The index as one compressed ``.npz`` (no pickles)."""
        meta = {
            "format": INDEX_FORMAT,
            "ngram": NGRAM,
            "short_match": self.short_match,
            "phash_threshold": self.phash_threshold,
            "benchmarks": self.benchmarks,
            **self.meta,
        }
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            # Tokens hold no whitespace, item ids no newline: newline-joined UTF-8 is exact and compact.
            vocab=np.frombuffer("\n".join(self.vocab_tokens).encode(), dtype=np.uint8),
            vocab_hashes=self.vocab_hashes[1:],
            ngram_hashes=self.ngram_hashes,
            ngram_items=self.ngram_items,
            exact_hashes=self.exact_hashes,
            exact_items=self.exact_items,
            exact_option_offsets=self.exact_option_offsets,
            exact_option_keys=self.exact_option_keys,
            image_sha256=self.image_sha256,
            image_sha256_items=self.image_sha256_items,
            image_phash=self.image_phash,
            image_phash_items=self.image_phash_items,
            item_benchmark=self.item_benchmark,
            item_ids=np.frombuffer("\n".join(self.item_ids).encode(), dtype=np.uint8),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> DecontamIndex:
        try:
            npz = np.load(io.BytesIO(data), allow_pickle=False)
            meta = json.loads(npz["meta"].tobytes())
        except (ValueError, OSError, KeyError) as exc:
            raise DecontamError(f"not a decontamination index: {exc}") from None
        if meta.get("format") != INDEX_FORMAT or meta.get("ngram") != NGRAM:
            raise DecontamError(f"unsupported decontamination index format {meta.get('format')!r}")
        vocab_text = npz["vocab"].tobytes().decode()
        ids_text = npz["item_ids"].tobytes().decode()
        return cls(
            vocab=vocab_text.split("\n") if vocab_text else [],
            vocab_hashes=npz["vocab_hashes"],
            ngram_hashes=npz["ngram_hashes"],
            ngram_items=npz["ngram_items"],
            exact_hashes=npz["exact_hashes"],
            exact_items=npz["exact_items"],
            exact_option_offsets=npz["exact_option_offsets"],
            exact_option_keys=npz["exact_option_keys"],
            image_sha256=npz["image_sha256"],
            image_sha256_items=npz["image_sha256_items"],
            image_phash=npz["image_phash"],
            image_phash_items=npz["image_phash_items"],
            item_benchmark=npz["item_benchmark"],
            benchmarks=meta["benchmarks"],
            item_ids=ids_text.split("\n") if ids_text else [],
            short_match=meta["short_match"],
            phash_threshold=meta["phash_threshold"],
            meta={k: v for k, v in meta.items() if k in ("registry_rows", "registry", "build_seconds")},
        )

    def save(self, uri: str) -> str:
        """Write the index to ``uri`` (any storage URI) atomically; returns ``uri``."""
        storage.write_bytes(uri, self.to_bytes())
        return uri

    @classmethod
    def load(cls, uri: str) -> DecontamIndex:
        """Load an index written by :meth:`save`."""
        if not storage.exists(uri):
            raise DecontamError(f"decontamination index not found: {uri}")
        return cls.from_bytes(storage.read_bytes(uri))

    # ---- matching

    def _item(self, idx: int) -> tuple[str, str]:
        return self.benchmarks[int(self.item_benchmark[idx])], self.item_ids[idx]

    def _ids(self, toks: list[str]) -> list[int]:
        get = self._vocab.get
        return [get(t, 0) for t in toks]

    def _options_match(self, lo: int, hi: int, options: Sequence[str] | None) -> int | None:
        """Item rule: the first registry entry in ``[lo, hi)`` (same stem) whose options the question shares."""
        if self.short_match == "text":
            return lo
        option_keys: set[int] = set()
        for opt in options or ():
            oids = self._ids(tokens(opt))
            if oids and 0 not in oids:
                option_keys.add(exact_key(self.vocab_hashes[oids].tolist()))
        for entry in range(lo, hi):
            item_keys = self.exact_option_keys[
                self.exact_option_offsets[entry] : self.exact_option_offsets[entry + 1]
            ]
            if len(option_keys.intersection(item_keys.tolist())) >= options_required(len(item_keys)):
                return entry
        return None

    def _short_keys(
        self, ids: np.ndarray, starts: np.ndarray, short: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised :func:`exact_key` of each short question's tokens; False where one is unknown."""
        width = NGRAM - 1
        length = starts[short + 1] - starts[short]
        col = np.arange(width)[None, :]
        valid = col < length[:, None]
        pos = np.minimum(starts[short][:, None] + col, len(ids) - 1)
        tok = np.where(valid, ids[pos], -1)
        known = ~((tok == 0).any(axis=1))
        values = self.vocab_hashes[np.maximum(tok, 0)]
        return exact_keys(values, valid, length), known

    def check_texts(
        self,
        texts: Sequence[str],
        options: Sequence[Sequence[str] | None] | Callable[[list[int]], list[list[str]]] | None = None,
    ) -> list[Match | None]:
        """Text rules only, for a batch of already-assembled texts (question [+ context]).

        ``options`` (used by the short-item rule) is a list parallel to ``texts`` or a function
        giving the option texts of the listed rows, so they are fetched only for short questions.
        """
        n = len(texts)
        token_lists = [tokens(t) for t in texts]
        lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=n)
        # dict.get mapped in C over the flat token list: the per-token cost that bounds throughput.
        flat = list(chain.from_iterable(token_lists))
        ids = np.array(list(map(self._vocab.get, flat, repeat(0, len(flat)))), dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(lengths)))
        matches: list[Match | None] = [None] * n

        # Whole-item equality for short questions: keys vectorised, options fetched only on a stem hit.
        short = np.nonzero((lengths < NGRAM) & (lengths > 0))[0]
        if len(self.exact_hashes) and len(short):
            keys, known = self._short_keys(ids, starts, short)
            lo = np.searchsorted(self.exact_hashes, keys, side="left")
            hi = np.searchsorted(self.exact_hashes, keys, side="right")
            found = np.nonzero(known & (hi > lo))[0]
            rows = short[found].tolist()
            if rows:
                if callable(options):
                    row_options: list[Sequence[str] | None] = list(options(rows))
                else:
                    row_options = [options[q] if options is not None else None for q in rows]
                for f, q, opts in zip(found.tolist(), rows, row_options, strict=True):
                    entry = self._options_match(int(lo[f]), int(hi[f]), opts)
                    if entry is not None:
                        bench, item = self._item(int(self.exact_items[entry]))
                        matches[q] = Match(TEXT_EXACT, bench, item, " ".join(token_lists[q]))

        # 16-gram overlap: one vectorised pass over the whole batch.
        if len(self.ngram_hashes) and len(ids) >= NGRAM:
            hashes = rolling_hashes(self.vocab_hashes[ids])
            # Checkable windows hold no unknown token (it can't be in a benchmark n-gram) and end
            # inside their own question (windows across a question boundary are discarded).
            ok = clean_windows(ids == 0)
            window_q = np.repeat(np.arange(n), lengths)[: len(ok)]
            ok &= np.arange(len(ok)) + NGRAM <= starts[window_q + 1]
            qid_of_start = window_q
            top = (hashes >> np.uint64(64 - _FILTER_BITS)).astype(np.int64)
            ok &= (self._filter[top >> 3] >> (top & 7).astype(np.uint8)) & 1 == 1
            cand = np.nonzero(ok)[0]
            if len(cand):
                ch = hashes[cand]
                pos = np.searchsorted(self.ngram_hashes, ch)
                pos[pos == len(self.ngram_hashes)] = 0
                hit = self.ngram_hashes[pos] == ch
                if not hit.any():
                    return matches
                hit_starts = cand[hit]
                hit_q = qid_of_start[hit_starts].astype(np.int64)
                hit_owner = self.ngram_items[pos[hit]].astype(np.int64)
                # Report the item sharing the most n-grams with the question (a shared opening like
                # "a 23 year old woman presents to her" may belong to another item first), and the
                # question's first window shared with it. Hits are in window order, so
                # np.unique's first index is the earliest window of each (question, item) pair.
                pair, first, count = np.unique(
                    hit_q * len(self.item_ids) + hit_owner, return_index=True, return_counts=True
                )
                pair_q = pair // len(self.item_ids)
                best = np.lexsort((first, -count, pair_q))
                take = best[np.concatenate(([True], pair_q[best][1:] != pair_q[best][:-1]))]
                for p in take.tolist():
                    q = int(pair_q[p])
                    if matches[q] is not None:
                        continue
                    f = int(first[p])
                    offset = int(hit_starts[f] - starts[q])
                    bench, item = self._item(int(hit_owner[f]))
                    detail = " ".join(token_lists[q][offset : offset + NGRAM])
                    matches[q] = Match(TEXT_NGRAM, bench, item, detail)
        return matches

    def check_images(
        self, sha256: Sequence[str | None], phash: Sequence[int | None], phash_threshold: int | None = None
    ) -> list[Match | None]:
        """Image rules for a flat list of images: exact SHA-256, then pHash within the threshold."""
        threshold = self.phash_threshold if phash_threshold is None else int(phash_threshold)
        out: list[Match | None] = [None] * len(sha256)
        for i, s in enumerate(sha256):
            idx = self._sha_lookup.get(s) if s else None
            if idx is not None:
                bench, item = self._item(idx)
                out[i] = Match(IMAGE_SHA256, bench, item, s)
        todo = [i for i, m in enumerate(out) if m is None and phash[i] is not None]
        if todo and len(self.image_phash) and threshold >= 0:
            queries = np.array([phash[i] for i in todo], dtype=np.uint64)
            # Bound the (queries x registry images) distance matrix to ~4M cells per chunk.
            step = max(1, 4_000_000 // len(self.image_phash))
            for lo in range(0, len(queries), step):
                dist = np.bitwise_count(queries[lo : lo + step, None] ^ self.image_phash[None, :])
                best = dist.argmin(axis=1)
                best_dist = dist[np.arange(len(best)), best]
                for j in np.nonzero(best_dist <= threshold)[0]:
                    bench, item = self._item(int(self.image_phash_items[best[j]]))
                    out[todo[lo + j]] = Match(IMAGE_PHASH, bench, item, str(int(best_dist[j])))
        return out

    def check_table(
        self, table: pa.Table | pa.RecordBatch, phash_threshold: int | None = None
    ) -> list[Match | None]:
        """The first match (or None) for every question row of a QUESTION_SCHEMA table or batch."""
        n = table.num_rows
        if n == 0:
            return []
        questions = table.column("question").to_pylist()
        texts = [strip_choices(q or "") for q in questions]
        if "metadata" in table.column_names:
            metadata = table.column("metadata")
            has_ctx = pc.fill_null(pc.match_substring(metadata, '"context'), False)
            for i in np.nonzero(np.asarray(has_ctx))[0].tolist():
                ctx = context_of(metadata[i].as_py())
                if ctx:
                    texts[i] = f"{texts[i]}\n{ctx}"

        def options_of(rows: list[int]) -> list[list[str]]:
            # Option texts matter only for short questions (whole-item rule): fetch just those rows.
            if "options" not in table.column_names:
                return [[] for _ in rows]
            taken = table.column("options").take(pa.array(rows, type=pa.int64())).to_pylist()
            return [[o["text"] for o in opts or []] for opts in taken]

        matches = self.check_texts(texts, options_of)

        if "images" in table.column_names and (len(self.image_sha256) or len(self.image_phash)):
            images = table.column("images")
            if isinstance(images, pa.ChunkedArray):
                images = images.combine_chunks()
            flat = pc.list_flatten(images)
            if len(flat):
                parents = np.asarray(pc.list_parent_indices(images))
                shas = flat.field("sha256").to_pylist()
                phashes = flat.field("phash").to_pylist()
                image_matches = self.check_images(shas, phashes, phash_threshold)
                for row, im in zip(parents.tolist(), image_matches, strict=True):
                    if im is None:
                        continue
                    current = matches[row]
                    if current is None or MATCH_KINDS.index(im.kind) < MATCH_KINDS.index(current.kind):
                        matches[row] = im
        return matches

    def check(self, row: Mapping[str, Any], phash_threshold: int | None = None) -> Match | None:
        """The first match for one question row (a dict in QUESTION_SCHEMA shape), or None."""
        fields = {f.name: row.get(f.name) for f in QUESTION_SCHEMA}
        fields["options"] = fields["options"] or []
        fields["images"] = fields["images"] or []
        table = pa.Table.from_pylist([fields], schema=_relaxed(QUESTION_SCHEMA))
        return self.check_table(table, phash_threshold)[0]


def _relaxed(schema: pa.Schema) -> pa.Schema:
    """``schema`` with every field nullable (ad-hoc rows in :meth:`DecontamIndex.check`)."""
    return pa.schema([f.with_nullable(True) for f in schema])


def load_index(index: str | None = None, registry: str | None = None, **kwargs: Any) -> DecontamIndex:
    """Load a saved index from ``index``, else build one from ``registry`` (default: bundled pack)."""
    if index:
        return DecontamIndex.load(index)
    return DecontamIndex.from_registry(registry, **kwargs)
