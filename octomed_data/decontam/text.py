"""Decontamination text rules: normalisation, tokens, choice-block stripping, stable hashes.

The rules every text comparison uses (the index, the registry's linking of benchmark copies):
NFKC + casefold, every non-letter/digit a separator, CJK characters one token each
(:func:`tokens`); appended answer-choice blocks cut off (:func:`strip_choices`); 64-bit token
values from BLAKE2b (:func:`token_hash`), never Python's randomised ``hash()``; n-grams by a
64-bit rolling polynomial hash (:func:`rolling_hashes`) and short texts by a whole-text key
(:func:`exact_key`, :func:`exact_keys`). Imports nothing from the registry or the index.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

NGRAM = 16

_MASK64 = (1 << 64) - 1
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


def exact_keys(values: np.ndarray, valid: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Vectorised :func:`exact_key`: row ``i``'s key over its first ``length[i]`` token values.

    ``values`` is (rows x width) uint64 token values, ``valid`` the (rows x width) mask of the
    first ``length[i]`` columns of each row.
    """
    h = (length + 1).astype(np.uint64)
    for k in range(values.shape[1]):
        h = np.where(valid[:, k], h * np.uint64(_P_EXACT) + values[:, k], h)
    return h


def options_required(n_options: int) -> int:
    """Options a question must share with a short benchmark item of ``n_options`` options."""
    return 0 if n_options == 0 else max(min(2, n_options), -(-n_options // 2))


def rolling_hashes(values: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """Rolling polynomial hash of every length-``n`` window of ``values`` (uint64, wraps mod 2**64)."""
    count = len(values) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    h = values[:count].copy()
    for k in range(1, n):
        h *= _P_NGRAM
        h += values[k : k + count]
    return h


def clean_windows(bad: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """For each window start, True when none of the ``n`` tokens in the window is ``bad``."""
    count = len(bad) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=bool)
    csum = np.concatenate(([0], np.cumsum(bad, dtype=np.int64)))
    return (csum[n : n + count] - csum[:count]) == 0


def context_of(metadata: str | None) -> str:
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
