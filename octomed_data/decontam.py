"""Decontamination: remove training questions that overlap a held-out benchmark item.

Rules (as in s1 and OctoMed, plus near-duplicate images):

* **Text normalisation** (:func:`tokens`): NFKC, casefold, then every character that is not a
  letter or digit (punctuation, symbols, ASCII and unicode quotes and dashes, underscores) is a
  separator and whitespace collapses. Tokens are words; CJK characters are one token each, since
  Chinese and Japanese text has no spaces. Appended "Answer Choices: (A) ..." / "A) ... B) ..."
  blocks are cut off first (:func:`strip_choices`), so copies that append options match
  copies that don't.
* **Long items (>= 16 tokens): 16-gram overlap, order-aware.** A question is contaminated when
  any 16 consecutive tokens of it equal 16 consecutive tokens of a benchmark item. Shuffled words
  or a 15-token overlap do not match.
* **Short items (< 16 tokens): whole-item equality**, never containment: containing "is there
  a fracture" would remove half of all VQA data. Two modes (``short_match``):

  - ``"item"`` (default): a short text-only item matches a question whose normalised stem equals
    it AND that shares at least half of the item's option texts (at least 2; order-free), so
    shuffled copies and 4-/5-option variants match while a generic stem ("Which of the following
    is true?") with other options does not. Short image-grounded items
    (VQA templates like "What modality is used to take this image?") are not matched on text at
    all: the same template on another image is not the test item; they are caught by image hash.
  - ``"text"``: the literal rule: a question whose whole normalised text equals a short item's
    text is removed, options and images ignored. Aggressive on VQA training sets.
* **What is checked**: the question text (appended option blocks cut off), which for
  PubMedQA-style rows already holds the context (ingest writes "Context: ... Question: ...");
  a context kept in ``metadata`` (keys ``context`` / ``contexts``) is checked too. Option texts
  count only through the short-item rule above, as in s1/OctoMed.
* **Images**: exact SHA-256 of the normalised image (the content address ingest stores), and
  near-duplicates by 64-bit pHash Hamming distance <= ``phash_threshold`` (default 6; re-encoded,
  resized or brightened copies of the real images land at 0-4, distinct images at >= 16).
* **Reported match**: kinds are tried as image_sha256, text_exact, text_ngram, image_phash; an
  n-gram match names the item sharing the most 16-grams with the question and the first of them.

The :class:`DecontamIndex` is built once from the registry pack into a few numpy arrays
(sorted 64-bit n-gram hashes, whole-item hashes, image hashes) and saved as one ``.npz`` file
through the storage layer, so shard workers load it and never re-read benchmark files.
Hashes are stable across processes: per-token 64-bit values come from BLAKE2b of the token,
never from Python's randomised ``hash()``. n-grams are compared by 64-bit polynomial hash, so a
false match needs a 64-bit collision (~4e-6 expected over 1M questions against 800k n-grams).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import re
import sys
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import chain, repeat
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from octomed_data import storage
from octomed_data.errors import OctomedError
from octomed_data.schema import QUESTION_SCHEMA, REMOVED_SCHEMA

log = logging.getLogger(__name__)

NGRAM = 16
DEFAULT_PHASH_THRESHOLD = 6
SHORT_MATCH_MODES = ("item", "text")
INDEX_FORMAT = "octomed-decontam-index/1"

# Match kinds, in the order they are tried (most certain first).
IMAGE_SHA256 = "image_sha256"
TEXT_EXACT = "text_exact"
TEXT_NGRAM = "text_ngram"
IMAGE_PHASH = "image_phash"
MATCH_KINDS = (IMAGE_SHA256, TEXT_EXACT, TEXT_NGRAM, IMAGE_PHASH)

_MASK64 = (1 << 64) - 1
_FILTER_BITS = 27
# Odd 64-bit multipliers for the polynomial hashes (arithmetic is mod 2**64).
_P_NGRAM = np.uint64(0x9E3779B97F4A7C15)
_P_EXACT = 0xC2B2AE3D27D4EB4F

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN_RE = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")
# "...\nAnswer Choices: (A) ..." (MedXpertQA eval format) or "...\nA) x\nB) y" / "... A)x, B)y" (R1 formats).
# ASCII letters/digits kept (upper -> lower), every other ASCII byte -> space; bytes >= 128 (UTF-8
# sequences) untouched, so the result is still valid UTF-8.
_ASCII_TABLE = bytes(
    (c | 0x20 if 65 <= c <= 90 else c) if chr(c).isalnum() or c >= 128 else 32 for c in range(256)
)
_CHOICES_RE = re.compile(r"\s*\n\s*Answer Choices:.*\Z", re.DOTALL)
_LETTER_LIST_RE = re.compile(r"\s+\(?A\)\s*\S.*?\s\(?B\)\s*\S.*\Z", re.DOTALL)


class DecontamError(OctomedError):
    """The decontamination input, registry or index cannot be used."""


# --------------------------------------------------------------------------- text


def strip_choices(text: str) -> str:
    """Cut an appended answer-choice block ("Answer Choices: (A) ...", "A) ... B) ...") off a question."""
    # Substring tests first: the regexes cost ~10x more and most questions have no choice block.
    stripped = _CHOICES_RE.sub("", text) if "Answer Choices:" in text else text
    if stripped == text and "A)" in text and "B)" in text:
        stripped = _LETTER_LIST_RE.sub("", text)
    return stripped.strip() or text.strip()


def normalize(text: str) -> str:
    """NFKC + casefold; the separators (punctuation, quotes, dashes, whitespace) are left to :func:`tokens`."""
    return unicodedata.normalize("NFKC", text).casefold()


def tokens(text: str) -> list[str]:
    """Normalised word tokens of ``text`` (punctuation is a separator; CJK characters are single tokens).

    Equivalent to ``_TOKEN_RE.findall(normalize(text))``, but ASCII separators are removed with a
    byte-table translate first (~8x faster than the regex); only pieces that still hold non-ASCII
    characters go through the regex.
    """
    if text.isascii():  # NFKC and casefold are the identity / lowercasing on ASCII
        return text.encode("ascii").translate(_ASCII_TABLE).decode("ascii").split()
    # Only the (few, short) runs of non-ASCII characters need per-character rules.
    text = _NON_ASCII_RUN.sub(_separate_non_ascii, normalize(text))
    return text.encode("utf-8").translate(_ASCII_TABLE).decode("utf-8").split()


_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")
_CJK_CHAR = re.compile(rf"[{_CJK}]")
_run_cache: dict[str, str] = {}


def _separate_non_ascii(match: re.Match[str]) -> str:
    """A non-ASCII run with separators as spaces and CJK characters as space-delimited tokens.

    Word characters (``str.isalnum``, exactly what ``\\w`` minus ``_`` means to ``re``) stay
    attached to their neighbours, so "café" stays one token, as with ``_TOKEN_RE``.
    """
    run = match.group()
    fixed = _run_cache.get(run)
    if fixed is None:
        fixed = "".join((f" {c} " if _CJK_CHAR.match(c) else c) if c.isalnum() else " " for c in run)
        if len(_run_cache) < 100_000:  # runs repeat ("°", "±", "’"); bound the cache all the same
            _run_cache[run] = fixed
    return fixed


def normalized_text(text: str) -> str:
    """The normalised form two texts are compared in: tokens joined by single spaces."""
    return " ".join(tokens(text))


def token_hash(token: str) -> int:
    """Stable 64-bit value of one token (BLAKE2b; never 0, which marks an unknown token)."""
    value = int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")
    return value or 1


def _fold(values: Iterable[int], start: int, mult: int) -> int:
    h = start
    for v in values:
        h = (h * mult + v) & _MASK64
    return h


def exact_key(token_values: Sequence[int]) -> int:
    """Whole-text key of a short text (stem or option): its token values in order, and its length."""
    return _fold(token_values, len(token_values) + 1, _P_EXACT)


def options_required(n_options: int) -> int:
    """Options a question must share with a short benchmark item of ``n_options`` options."""
    return 0 if n_options == 0 else max(min(2, n_options), -(-n_options // 2))


def _ngram_hashes(values: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """Rolling polynomial hash of every length-``n`` window of ``values`` (uint64, wraps mod 2**64)."""
    count = len(values) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    h = values[:count].copy()
    for k in range(1, n):
        h *= _P_NGRAM
        h += values[k : k + count]
    return h


def _window_ok(bad: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """For each window start, True when none of the ``n`` tokens in the window is ``bad``."""
    count = len(bad) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=bool)
    csum = np.concatenate(([0], np.cumsum(bad, dtype=np.int64)))
    return (csum[n : n + count] - csum[:count]) == 0


def _context_of(metadata: str | None) -> str:
    """The context passage of a PubMedQA-style row, from its metadata JSON (empty if none)."""
    if not metadata:
        return ""
    try:
        meta = json.loads(metadata)
    except ValueError:
        return ""
    if not isinstance(meta, dict):
        return ""
    parts: list[str] = []
    for key in ("contexts", "context"):
        value = meta.get(key)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts.extend(str(v) for v in value if v)
    return "\n".join(parts)


# --------------------------------------------------------------------------- index


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
        from octomed_data.registry import load_registry  # registry imports this module's text rules

        table = registry if isinstance(registry, pa.Table) else load_registry(registry)
        if short_match not in SHORT_MATCH_MODES:
            raise DecontamError(f"short_match must be one of {SHORT_MATCH_MODES}, not {short_match!r}")
        started = time.perf_counter()
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
            hashes = np.concatenate([_ngram_hashes(values[c]) for c in ngram_chunks])
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

        index = cls(
            vocab=vocab_tokens,
            vocab_hashes=vocab_hashes,
            ngram_hashes=ngram_hashes,
            ngram_items=ngram_items,
            exact_hashes=np.array([h for (h, _), _ in exact_sorted], dtype=np.uint64),
            exact_items=np.array([i for _, i in exact_sorted], dtype=np.int32),
            exact_option_offsets=np.concatenate(([0], np.cumsum(option_counts, dtype=np.int64))),
            exact_option_keys=np.array([k for (_, keys), _ in exact_sorted for k in keys], dtype=np.uint64),
            image_sha256=np.array(list(sha_items), dtype="S64"),
            image_sha256_items=np.array(list(sha_items.values()), dtype=np.int32),
            image_phash=np.array(list(phash_items), dtype=np.uint64),
            image_phash_items=np.array(list(phash_items.values()), dtype=np.int32),
            item_benchmark=np.array(item_benchmark, dtype=np.int16),
            benchmarks=benchmarks,
            item_ids=item_ids,
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
        h = (length + 1).astype(np.uint64)
        for k in range(width):
            h = np.where(valid[:, k], h * np.uint64(_P_EXACT) + values[:, k], h)
        return h, known

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
            hashes = _ngram_hashes(self.vocab_hashes[ids])
            # Checkable windows hold no unknown token (it can't be in a benchmark n-gram) and end
            # inside their own question (windows across a question boundary are discarded).
            ok = _window_ok(ids == 0)
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
                ctx = _context_of(metadata[i].as_py())
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


# --------------------------------------------------------------------------- datasets


@dataclass
class DecontamResult:
    """What one decontamination run did."""

    questions_uri: str
    kept_uri: str
    removed_uri: str
    input: int = 0
    kept: int = 0
    removed: int = 0
    by_benchmark: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)
    shards: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _questions_dataset(questions_uri: str) -> storage.Dataset:
    """The question dataset at ``questions_uri``, or at ``questions_uri/questions`` (an ingest output root)."""
    ds = storage.Dataset(questions_uri, QUESTION_SCHEMA)
    if ds.manifest():
        return ds
    nested = storage.Dataset(storage.join(questions_uri, "questions"), QUESTION_SCHEMA)
    if nested.manifest():
        return nested
    raise DecontamError(
        f"no committed question shards at {questions_uri} (nor at {nested.uri}); "
        "expected a dataset written by `octomed-data ingest`"
    )


def decontaminate_shard(
    index: DecontamIndex,
    questions_uri: str,
    shard: str,
    out: str,
    *,
    phash_threshold: int | None = None,
    batch_size: int = 8192,
) -> dict[str, Any]:
    """Decontaminate one committed question shard.

    Writes the same-named shard to ``out/questions`` (kept, QUESTION_SCHEMA) and ``out/removed``
    (REMOVED_SCHEMA, with the matched benchmark item); both are written even when empty, so a
    re-run replaces rather than duplicates. Returns the shard's counts.
    """
    source = storage.Dataset(questions_uri, QUESTION_SCHEMA)
    kept_parts: list[pa.Table] = []
    removed_parts: list[pa.Table] = []
    by_benchmark: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    total = 0
    for batch in source.iter_batches(batch_size=batch_size, shards=[shard]):
        table = pa.Table.from_batches([batch])
        matches = index.check_table(table, phash_threshold)
        total += table.num_rows
        hit = np.fromiter((m is not None for m in matches), dtype=bool, count=len(matches))
        kept_parts.append(table.filter(pa.array(~hit)))
        if hit.any():
            found = [m for m in matches if m is not None]
            removed = table.filter(pa.array(hit))
            removed = removed.append_column("match_kind", pa.array([m.kind for m in found], pa.string()))
            removed = removed.append_column(
                "match_benchmark", pa.array([m.benchmark for m in found], pa.string())
            )
            removed = removed.append_column("match_item", pa.array([m.item_id for m in found], pa.string()))
            removed = removed.append_column("match_detail", pa.array([m.detail for m in found], pa.string()))
            removed_parts.append(removed)
            by_benchmark.update(m.benchmark for m in found)
            by_kind.update(m.kind for m in found)
    kept = _concat(kept_parts, QUESTION_SCHEMA)
    removed_table = _concat(removed_parts, REMOVED_SCHEMA)
    counts = {
        "shard": shard,
        "input": total,
        "kept": kept.num_rows,
        "removed": removed_table.num_rows,
        "by_benchmark": dict(sorted(by_benchmark.items())),
        "by_kind": dict(sorted(by_kind.items())),
    }
    if counts["kept"] + counts["removed"] != total:  # cannot happen; never write a lossy shard
        raise DecontamError(f"shard {shard}: kept + removed != input ({counts})")
    storage.Dataset(storage.join(out, "questions"), QUESTION_SCHEMA).write_shard(shard, kept, extra=counts)
    storage.Dataset(storage.join(out, "removed"), REMOVED_SCHEMA).write_shard(
        shard, removed_table, extra=counts
    )
    return counts


def _concat(parts: list[pa.Table], schema: pa.Schema) -> pa.Table:
    if not parts:
        return schema.empty_table()
    return pa.concat_tables([p.select(schema.names).cast(schema) for p in parts])


def drop_stale_shards(out: str, shards: Iterable[str]) -> list[str]:
    """Un-commit ``out/questions`` and ``out/removed`` shards whose input shard is gone; returns their names."""
    keep = set(shards)
    dropped: set[str] = set()
    for name, schema in (("questions", QUESTION_SCHEMA), ("removed", REMOVED_SCHEMA)):
        ds = storage.Dataset(storage.join(out, name), schema)
        for shard in ds.manifest():
            if shard not in keep:
                ds.delete_shard(shard)
                dropped.add(shard)
    return sorted(dropped)


def decontaminate(
    questions_uri: str,
    out: str,
    *,
    registry: str | None = None,
    index: DecontamIndex | None = None,
    phash_threshold: int | None = None,
    short_match: str = "item",
    progress: bool = False,
) -> DecontamResult:
    """Decontaminate every committed shard of ``questions_uri`` into ``out/questions`` + ``out/removed``.

    The index is built once (from ``registry``, default the bundled pack) unless one is given;
    ``phash_threshold`` defaults to the index's (6). Shards are streamed one at a time; output
    shards left by an earlier run over other input shards are un-committed, and a summary is
    written to ``out/decontam.json``.
    """
    started = time.perf_counter()
    source = _questions_dataset(questions_uri)
    storage.ensure_writable(out)
    if index is None:
        index = DecontamIndex.from_registry(
            registry,
            short_match=short_match,
            phash_threshold=DEFAULT_PHASH_THRESHOLD if phash_threshold is None else phash_threshold,
        )
    result = DecontamResult(
        questions_uri=source.uri,
        kept_uri=storage.join(out, "questions"),
        removed_uri=storage.join(out, "removed"),
    )
    by_benchmark: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    shards = list(source.manifest())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(shards), desc="decontaminate", unit="shard", file=sys.stderr)
    for shard in shards:
        counts = decontaminate_shard(index, source.uri, shard, out, phash_threshold=phash_threshold)
        result.shards.append(counts)
        result.input += counts["input"]
        result.kept += counts["kept"]
        result.removed += counts["removed"]
        by_benchmark.update(counts["by_benchmark"])
        by_kind.update(counts["by_kind"])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(kept=result.kept, removed=result.removed)
    if bar is not None:
        bar.close()
    drop_stale_shards(out, shards)
    result.by_benchmark = dict(sorted(by_benchmark.items()))
    result.by_kind = dict(sorted(by_kind.items()))
    result.seconds = round(time.perf_counter() - started, 3)
    storage.write_json(storage.join(out, "decontam.json"), result.to_dict())
    return result


# --------------------------------------------------------------------------- CLI


def _cmd_decontaminate(args: argparse.Namespace) -> int:
    if args.phash_threshold < 0 or args.phash_threshold > 64:
        raise DecontamError("--phash-threshold must be between 0 and 64")
    index = None
    if args.index:
        index = DecontamIndex.load(args.index)
    result = decontaminate(
        args.questions_uri,
        args.out,
        registry=args.registry,
        index=index,
        phash_threshold=args.phash_threshold,
        short_match=args.short_match,
        progress=not args.quiet,
    )
    print(f"questions: {result.input}  kept: {result.kept}  removed: {result.removed}")
    for name, n in result.by_benchmark.items():
        print(f"  removed for {name}: {n}")
    for kind, n in result.by_kind.items():
        print(f"  removed by {kind}: {n}")
    print(f"kept    -> {result.kept_uri}")
    print(f"removed -> {result.removed_uri}")
    return 0


def _cmd_registry_build(args: argparse.Namespace) -> int:
    from octomed_data.registry import build_registry, write_registry

    table = build_registry(args.data_dir, progress=not args.quiet)
    size = write_registry(table, args.out)
    print(f"wrote {table.num_rows} registry rows ({size / 1e6:.2f} MB) -> {args.out}")
    return 0


def _cmd_registry_show(args: argparse.Namespace) -> int:
    from octomed_data.registry import load_registry, registry_counts

    table = load_registry(args.registry)
    counts = registry_counts(table)
    print(f"{'benchmark':<22}{'items':>8}{'rows':>8}{'images':>8}")
    for name, c in counts.items():
        print(f"{name:<22}{c['items']:>8}{c['rows']:>8}{c['images']:>8}")
    total = {k: sum(c[k] for c in counts.values()) for k in ("items", "rows", "images")}
    print(f"{'total':<22}{total['items']:>8}{total['rows']:>8}{total['images']:>8}")
    return 0


def _cmd_registry_index(args: argparse.Namespace) -> int:
    index = DecontamIndex.from_registry(args.registry, short_match=args.short_match)
    index.save(args.out)
    print(f"wrote {index!r} -> {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``decontaminate`` and the ``registry`` command group to the CLI."""
    p = subparsers.add_parser(
        "decontaminate",
        help="remove questions that overlap held-out benchmarks (16-gram text, image hashes)",
        description="Writes kept questions to OUT/questions and removed ones to OUT/removed.",
    )
    p.add_argument(
        "questions_uri", metavar="QUESTIONS_URI", help="question dataset (or an ingest output root)"
    )
    p.add_argument("--out", required=True, help="output root URI")
    p.add_argument("--registry", help="registry pack (default: the bundled one)")
    p.add_argument("--index", help="a saved index (from `registry index`) instead of building one")
    p.add_argument("--phash-threshold", type=int, default=DEFAULT_PHASH_THRESHOLD, help="max pHash distance")
    p.add_argument(
        "--short-match", choices=SHORT_MATCH_MODES, default="item", help="rule for items < 16 tokens"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_decontaminate)

    reg = subparsers.add_parser("registry", help="the benchmark registry (held-out test items)")
    rsub = reg.add_subparsers(dest="registry_command", metavar="ACTION")
    b = rsub.add_parser("build", help="build a registry pack from benchmark files")
    b.add_argument("--data-dir", required=True, help="folder laid out like ../shared/data")
    b.add_argument("--out", required=True, help="output Parquet path or URI")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_registry_build)
    s = rsub.add_parser("show", help="items per benchmark in a registry pack")
    s.add_argument("--registry", help="registry pack (default: the bundled one)")
    s.set_defaults(func=_cmd_registry_show)
    i = rsub.add_parser("index", help="build the decontamination index once and save it for shard workers")
    i.add_argument("--registry", help="registry pack (default: the bundled one)")
    i.add_argument("--out", required=True, help="index URI (.npz)")
    i.add_argument("--short-match", choices=SHORT_MATCH_MODES, default="item")
    i.set_defaults(func=_cmd_registry_index)
