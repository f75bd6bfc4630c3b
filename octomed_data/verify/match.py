"""Normalized matching of open-ended answers: numbers, units, plurals and medical synonyms.

Exact match (:func:`octomed_data.answers.is_correct`) compares :func:`~octomed_data.answers.normalize_open`
text, which takes numbers apart ("0.5" becomes "0 5") and knows no synonyms. :func:`equivalent`
says why two answers mean the same, or ``None``:

* ``numeric``: both are one quantity and the values agree (decided first: normalised text drops
  signs, decimal points and percent signs, so "-3", "3" and "3%" would look alike). "0.5" == ".5" == "1/2" == "50%"
  (a percentage equals the plain number a hundredth of it, never the bare number: "5%" != "5");
  "1,000" == "1000"; "two" == "2"; units of one dimension convert ("5 mm" == "0.5 cm",
  "1 g" == "1000 mg", "2 h" == "120 min"); a unit on one side only is ignored ("5" == "5 cm");
  units of different dimensions never match ("5 mg" != "5 ml");
* ``exact``: the normalised texts are equal;
* ``plural``: equal once each word's plural ending is dropped ("kidneys" == "kidney");
* ``synonym``: equal once phrases of one synonym group are replaced by the group
  ("CT scan" == "computed tomography", "chest X-ray" == "chest radiograph"), from the versioned
  table :data:`MEDICAL_SYNONYMS` plus the user's groups.

The table is deliberately small and conservative: a wrong synonym accepts wrong traces. Bump
:data:`SYNONYMS_VERSION` when it changes (it is part of the filter stage's fingerprint).
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections.abc import Iterable, Sequence

from octomed_data.answers import normalize_open

SYNONYMS_VERSION = "med-synonyms-v1"

# Groups of phrases that name the same thing as a short answer. Abbreviations that are common
# English words ("us", "mr") are left out on purpose.
MEDICAL_SYNONYMS: tuple[tuple[str, ...], ...] = (
    (
        "x-ray",
        "xray",
        "x ray",
        "radiograph",
        "radiography",
        "plain film",
        "plain radiograph",
        "roentgenogram",
    ),
    ("ct", "ct scan", "computed tomography", "cat scan", "computerized tomography"),
    ("mri", "mr imaging", "magnetic resonance imaging", "magnetic resonance"),
    ("ultrasound", "ultrasonography", "sonography", "sonogram", "usg"),
    ("pet", "positron emission tomography", "pet scan"),
    ("axial", "transverse", "axial plane", "transverse plane"),
    ("coronal", "frontal plane", "coronal plane"),
    ("sagittal", "sagittal plane"),
    ("pa", "posteroanterior", "postero anterior", "pa view"),
    ("ap", "anteroposterior", "antero posterior", "ap view"),
    ("flair", "fluid attenuated inversion recovery"),
    ("t1", "t1 weighted", "t1w"),
    ("t2", "t2 weighted", "t2w"),
    ("dwi", "diffusion weighted", "diffusion weighted imaging"),
    ("kidney", "renal"),
    ("liver", "hepatic"),
    ("lung", "pulmonary"),
    ("heart", "cardiac"),
    ("brain", "cerebral"),
    ("myocardial infarction", "mi", "heart attack"),
    ("stroke", "cerebrovascular accident", "cva"),
    ("hypertension", "htn", "high blood pressure"),
    ("pneumothorax", "collapsed lung"),
    ("pleural effusion", "fluid in the pleural space"),
    ("tuberculosis", "tb"),
    ("deep vein thrombosis", "dvt", "deep venous thrombosis"),
    ("pulmonary embolism", "pe", "pulmonary embolus"),
    ("gastrointestinal", "gi"),
    ("central nervous system", "cns"),
    ("intravenous", "iv"),
    ("left", "lt"),
    ("right", "rt"),
    ("bilateral", "both sides"),
)

_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
_QUANTITY = re.compile(
    rf"^(?:(?P<a>{_NUM})\s*/\s*(?P<b>{_NUM})|(?P<n>{_NUM}))\s*(?P<unit>%|[a-zµμ][a-zµμ0-9/^]*(?:\s+per\s+[a-z]+)?)?$"
)
_WORD_NUMBERS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_WORD_NUMBERS |= {"half": 0.5, "quarter": 0.25, "a half": 0.5, "one half": 0.5}
# unit -> (dimension, factor to the dimension's base unit). A unit not listed here matches only itself.
_UNITS: dict[str, tuple[str, float]] = {
    "%": ("fraction", 0.01),
    "percent": ("fraction", 0.01),
    "kg": ("mass", 1e3),
    "g": ("mass", 1.0),
    "gram": ("mass", 1.0),
    "mg": ("mass", 1e-3),
    "mcg": ("mass", 1e-6),
    "ug": ("mass", 1e-6),
    "µg": ("mass", 1e-6),
    "μg": ("mass", 1e-6),
    "ng": ("mass", 1e-9),
    "km": ("length", 1e3),
    "m": ("length", 1.0),
    "meter": ("length", 1.0),
    "metre": ("length", 1.0),
    "cm": ("length", 1e-2),
    "mm": ("length", 1e-3),
    "um": ("length", 1e-6),
    "µm": ("length", 1e-6),
    "μm": ("length", 1e-6),
    "l": ("volume", 1.0),
    "liter": ("volume", 1.0),
    "litre": ("volume", 1.0),
    "dl": ("volume", 0.1),
    "ml": ("volume", 1e-3),
    "cc": ("volume", 1e-3),
    "ul": ("volume", 1e-6),
    "µl": ("volume", 1e-6),
    "s": ("time", 1.0),
    "sec": ("time", 1.0),
    "second": ("time", 1.0),
    "min": ("time", 60.0),
    "minute": ("time", 60.0),
    "h": ("time", 3600.0),
    "hr": ("time", 3600.0),
    "hour": ("time", 3600.0),
    "day": ("time", 86400.0),
    "week": ("time", 604800.0),
    "wk": ("time", 604800.0),
    "year": ("time", 31557600.0),
    "yr": ("time", 31557600.0),
}


def _unit_key(unit: str) -> str:
    unit = unit.strip().lower()
    if unit not in _UNITS and len(unit) > 3 and unit.endswith("s"):
        unit = unit[:-1]  # "hours" -> "hour", "grams" -> "gram"
    return unit


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def parse_quantity(text: str) -> tuple[float, str | None] | None:
    """``(value, unit)`` when the whole answer is one number, fraction or percentage (with a unit)."""
    t = unicodedata.normalize("NFKC", text).strip().lower().rstrip(".").strip()
    if t in _WORD_NUMBERS:
        return float(_WORD_NUMBERS[t]), None
    m = _QUANTITY.match(t)
    if m is None:
        return None
    if m.group("n") is not None:
        value = _number(m.group("n"))
    else:
        a, b = _number(m.group("a")), _number(m.group("b"))
        value = None if a is None or not b else a / b
    if value is None:
        return None
    unit = m.group("unit")
    return value, (_unit_key(unit) if unit else None)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def same_quantity(a: tuple[float, str | None], b: tuple[float, str | None]) -> bool:
    """Do two parsed quantities agree (units converted within a dimension; see the module docstring)?"""
    (va, ua), (vb, ub) = a, b
    if ua == ub:
        return _close(va, vb)
    if ua in ("%", "percent") and ub in ("%", "percent"):
        return _close(va, vb)
    da, db = _UNITS.get(ua or ""), _UNITS.get(ub or "")
    if ua is None or ub is None:
        known = da or db
        if known is not None and known[0] == "fraction":  # "50%" vs "0.5"; never "5%" vs "5"
            other = vb if ua is not None else va
            pct = va if ua is not None else vb
            return _close(pct * known[1], other)
        return _close(va, vb)  # a unit on one side only: "5" vs "5 cm"
    if da is None or db is None or da[0] != db[0]:
        return False
    return _close(va * da[1], vb * db[1])


def _stem(word: str) -> str:
    """A plural ending dropped ("kidneys" -> "kidney", "arteries" -> "artery"); short words kept."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _words(text: str) -> list[str]:
    return [_stem(w) for w in normalize_open(text).split()]


class Matcher:
    """:func:`equivalent` with the built-in table plus ``extra`` synonym groups (each a list of phrases)."""

    def __init__(self, extra: Iterable[Sequence[str]] = ()) -> None:
        self._canon: dict[tuple[str, ...], str] = {}
        groups = [*MEDICAL_SYNONYMS, *(tuple(g) for g in extra)]
        for i, group in enumerate(groups):
            members = [tuple(_words(p)) for p in group if _words(p)]
            # A phrase already in a group joins that group (user pairs extend the table).
            ids = {self._canon[m] for m in members if m in self._canon}
            canon = min(ids) if ids else f"syn{i:04d}"
            for m in members:
                self._canon[m] = canon
            for old in ids - {canon}:  # two groups joined by a user pair become one
                for k, v in self._canon.items():
                    if v == old:
                        self._canon[k] = canon
        self._longest = max((len(k) for k in self._canon), default=0)

    def canonical(self, text: str) -> list[str]:
        """Words with plurals dropped and synonym phrases (longest first) replaced by their group."""
        words = _words(text)
        out: list[str] = []
        i = 0
        while i < len(words):
            for n in range(min(self._longest, len(words) - i), 0, -1):
                canon = self._canon.get(tuple(words[i : i + n]))
                if canon is not None:
                    out.append(canon)
                    i += n
                    break
            else:
                out.append(words[i])
                i += 1
        return out

    def equivalent(self, reference: str | None, candidate: str | None) -> str | None:
        """Why ``candidate`` means ``reference`` (exact, numeric, plural, synonym), or None."""
        if not reference or not candidate:
            return None
        # Numbers first: normalised text drops signs, points and percent signs ("-3" == "3").
        qa, qb = parse_quantity(reference), parse_quantity(candidate)
        if qa is not None and qb is not None:
            return "numeric" if same_quantity(qa, qb) else None
        ref, cand = normalize_open(reference), normalize_open(candidate)
        if ref and ref == cand:
            return "exact"
        wa, wb = _words(reference), _words(candidate)
        if wa and wa == wb:
            return "plural"
        ca, cb = self.canonical(reference), self.canonical(candidate)
        if ca and ca == cb:
            return "synonym"
        return None


@functools.lru_cache(maxsize=1)
def _default() -> Matcher:
    return Matcher()


def equivalent(reference: str | None, candidate: str | None) -> str | None:
    """:meth:`Matcher.equivalent` with the built-in synonym table only."""
    return _default().equivalent(reference, candidate)
