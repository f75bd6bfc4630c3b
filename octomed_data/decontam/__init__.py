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

Modules: :mod:`.text` (normalisation, tokens, hashes; imports nothing from the registry, which
uses it to link benchmark copies), :mod:`.index` (:class:`DecontamIndex`, :class:`Match`,
:func:`load_index`; the module that reads the registry), :mod:`.shard` (:func:`decontaminate_shard`; a whole dataset is the decontaminate stage,
:func:`octomed_data.stages.decontaminate.decontaminate`); the ``decontaminate`` and ``registry`` commands
are in :mod:`cli.decontam`. The index and shard names are loaded on first
use, so importing the text rules (as the registry does) never imports the index.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from octomed_data.decontam.text import NGRAM, normalize, normalized_text, strip_choices, tokens

if TYPE_CHECKING:
    from octomed_data.decontam.index import (
        DEFAULT_PHASH_THRESHOLD,
        MATCH_KINDS,
        SHORT_MATCH_MODES,
        DecontamError,
        DecontamIndex,
        Match,
        load_index,
    )
    from octomed_data.decontam.shard import DecontamResult, decontaminate_shard

# Public name -> the submodule defining it, imported on first attribute access (PEP 562).
_LAZY = {
    "DEFAULT_PHASH_THRESHOLD": "index",
    "MATCH_KINDS": "index",
    "SHORT_MATCH_MODES": "index",
    "DecontamError": "index",
    "DecontamIndex": "index",
    "Match": "index",
    "load_index": "index",
    "DecontamResult": "shard",
    "decontaminate_shard": "shard",
}

__all__ = [
    "DEFAULT_PHASH_THRESHOLD",
    "MATCH_KINDS",
    "NGRAM",
    "SHORT_MATCH_MODES",
    "DecontamError",
    "DecontamIndex",
    "DecontamResult",
    "Match",
    "decontaminate_shard",
    "load_index",
    "normalize",
    "normalized_text",
    "strip_choices",
    "tokens",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
