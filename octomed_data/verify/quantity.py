"""Quantities in short answers: numbers, number words, fractions, ratios, ranges, bounds and units.

A whole answer that is one measure ("0.5 cm", "2-5 mm", "< 40%", "120/80 mmHg", "38 °C", "two weeks")
parses to a :class:`Measure`; :func:`same_measure` says whether two agree. What is kept apart on
purpose: a range is not a decimal ("2-5" != "2.5"), a bound is not its value and ``<`` is not ``>``,
a ratio is compared part by part ("120/80" != "150/100", though both are 1.5 as fractions), a sign
counts ("-2.5" != "2.5"), and units of one dimension convert ("5 mm" == "0.5 cm", "38 °C" == "100.4 °F",
"2 weeks" == "14 days") while units of another size or dimension never match. A known unit on one
side only is left out ("5" == "5 cm"); any other word is not ("3" != "3 absent").
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = {
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
}
_ORDINALS = (
    "zeroth first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth "
    "fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth"
).split()
NUMBER_WORDS: dict[str, int] = {w: i for i, w in enumerate(_ONES)} | _TENS
ORDINAL_WORDS: dict[str, int] = {w: i for i, w in enumerate(_ORDINALS) if i}
_FRACTION_WORDS = {"half": 0.5, "a half": 0.5, "one half": 0.5, "quarter": 0.25, "a quarter": 0.25}

# unit -> (dimension, factor to the dimension's base unit). A unit not listed matches only itself.
UNITS: dict[str, tuple[str, float]] = {
    "%": ("fraction", 0.01),
    "percent": ("fraction", 0.01),
    "kg": ("mass", 1e3),
    "g": ("mass", 1.0),
    "gram": ("mass", 1.0),
    "mg": ("mass", 1e-3),
    "mcg": ("mass", 1e-6),
    "ug": ("mass", 1e-6),
    "µg": ("mass", 1e-6),
    "ng": ("mass", 1e-9),
    "lb": ("mass", 453.59237),
    "km": ("length", 1e3),
    "m": ("length", 1.0),
    "meter": ("length", 1.0),
    "metre": ("length", 1.0),
    "cm": ("length", 1e-2),
    "centimeter": ("length", 1e-2),
    "centimetre": ("length", 1e-2),
    "mm": ("length", 1e-3),
    "millimeter": ("length", 1e-3),
    "millimetre": ("length", 1e-3),
    "um": ("length", 1e-6),
    "µm": ("length", 1e-6),
    "inch": ("length", 0.0254),
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
    "d": ("time", 86400.0),
    "day": ("time", 86400.0),
    "week": ("time", 604800.0),
    "wk": ("time", 604800.0),
    "month": ("time", 31557600.0 / 12),
    "mo": ("time", 31557600.0 / 12),
    "year": ("time", 31557600.0),
    "yr": ("time", 31557600.0),
    "mmhg": ("pressure", 1.0),
    "mm hg": ("pressure", 1.0),
    "°c": ("temperature", 1.0),
    "c": ("temperature", 1.0),
    "celsius": ("temperature", 1.0),
    "degree celsius": ("temperature", 1.0),
    "degrees celsius": ("temperature", 1.0),
    "deg c": ("temperature", 1.0),
    "°f": ("temperature", 5 / 9),
    "f": ("temperature", 5 / 9),
    "fahrenheit": ("temperature", 5 / 9),
    "degree fahrenheit": ("temperature", 5 / 9),
    "degrees fahrenheit": ("temperature", 5 / 9),
    "deg f": ("temperature", 5 / 9),
}
_FAHRENHEIT = {"°f", "f", "fahrenheit", "degree fahrenheit", "degrees fahrenheit", "deg f"}
# Bounds written as words, each mapped to one operator (the tokenizer reads them too) ...
WORD_BOUNDS = {
    "less than": "<",
    "lower than": "<",
    "smaller than": "<",
    "fewer than": "<",
    "below": "<",
    "under": "<",
    "more than": ">",
    "greater than": ">",
    "larger than": ">",
    "higher than": ">",
    "above": ">",
    "over": ">",
    "exceeding": ">",
    "at most": "<=",
    "up to": "<=",
    "no more than": "<=",
    "not more than": "<=",
    "at least": ">=",
    "no less than": ">=",
    "not less than": ">=",
}
# ... and as symbols.
_BOUNDS = {"<": "<", ">": ">", "<=": "<=", ">=": ">=", **WORD_BOUNDS}
_BOUND_RE = "|".join(sorted((re.escape(b) for b in _BOUNDS), key=len, reverse=True))
_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
_UNIT = r"%|°\s?[cf]|[a-zµμ][a-zµμ0-9/^]*(?:\s+(?:per\s+[a-z]+|hg|celsius|fahrenheit|c|f))?"
_QUANTITY = re.compile(rf"^(?:(?P<a>{_NUM})\s*/\s*(?P<b>{_NUM})|(?P<n>{_NUM}))\s*(?P<unit>{_UNIT})?$")
_MEASURE = re.compile(
    rf"^(?:(?P<op>{_BOUND_RE})\s*)?(?P<a>{_NUM})"
    rf"(?:\s*(?P<sep>-|to|/)\s*(?P<b>{_NUM}))?\s*(?P<unit>{_UNIT})?$"
)
_DASHES = str.maketrans({"–": "-", "—": "-", "−": "-", "‐": "-", "‑": "-", "≤": "<", "≥": ">"})


def clean(text: str) -> str:
    """NFKC, lower case, one kind of dash, ``≤``/``≥`` as ``<=``/``>=``, single spaces."""
    text = unicodedata.normalize("NFKC", text).replace("≤", "<=").replace("≥", ">=")
    return " ".join(text.translate(_DASHES).lower().split())


def words_to_digits(text: str) -> str:
    """Number words as digits ("twenty five" -> "25", "third" -> "3rd"); other words untouched."""
    out: list[str] = []
    words = text.split(" ")
    i = 0
    while i < len(words):
        w = words[i]
        if (
            w in _TENS
            and i + 1 < len(words)
            and words[i + 1] in NUMBER_WORDS
            and NUMBER_WORDS[words[i + 1]] < 10
        ):
            out.append(str(_TENS[w] + NUMBER_WORDS[words[i + 1]]))
            i += 2
            continue
        if w in NUMBER_WORDS:
            out.append(str(NUMBER_WORDS[w]))
        elif w in ORDINAL_WORDS:
            n = ORDINAL_WORDS[w]
            suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
            out.append(f"{n}{suffix}")
        else:
            out.append(w)
        i += 1
    return " ".join(out)


def unit_key(unit: str) -> str:
    """A unit's table key: lower case, "°" joined, a plural "s" dropped ("hours" -> "hour")."""
    unit = re.sub(r"°\s+", "°", unit.strip().lower())
    unit = re.sub(r"^degs?\b\.?", "deg", unit)
    if unit in UNITS:
        return unit
    if len(unit) > 3 and unit.endswith("s") and unit[:-1] in UNITS:
        return unit[:-1]  # "hours" -> "hour", "grams" -> "gram"
    if unit.endswith("es") and unit[:-2] in UNITS:
        return unit[:-2]  # "inches" -> "inch"
    return unit


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def parse_quantity(text: str) -> tuple[float, str | None] | None:
    """``(value, unit)`` when the whole answer is one number, fraction or percentage (with a unit)."""
    t = clean(text).rstrip(".").strip()
    if t in _FRACTION_WORDS:
        return _FRACTION_WORDS[t], None
    t = words_to_digits(t)
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
    return value, (unit_key(unit) if unit else None)


@dataclass(frozen=True)
class Measure:
    """One measure: a value, a range (``hi``) or a ratio (``den``), a bound (``op``) and a unit.

    ``fraction`` marks a ratio written as a proper fraction ("1/2"), which also equals its value.
    ``digits`` is the number of decimals written (for temperature rounding).
    """

    value: float
    unit: str | None = None
    op: str | None = None
    hi: float | None = None
    den: float | None = None
    fraction: bool = False
    digits: int = 0


def _decimals(text: str) -> int:
    return len(text.split(".", 1)[1]) if "." in text else 0


def parse_measure(text: str) -> Measure | None:
    """The :class:`Measure` when the whole answer is one (see the module docstring), else None."""
    t = clean(text).rstrip(".").strip()
    if t in _FRACTION_WORDS:
        return Measure(_FRACTION_WORDS[t])
    t = words_to_digits(t)
    t = re.sub(r"^(?:an?|one)\s+(?=[a-z])", "1 ", t)  # "a week", "an hour"
    m = _MEASURE.match(t)
    if m is None:
        return None
    a = _number(m.group("a"))
    b = _number(m.group("b")) if m.group("b") else None
    if a is None:
        return None
    unit = unit_key(m.group("unit")) if m.group("unit") else None
    if unit is not None and unit not in UNITS and not re.fullmatch(r"[a-zµ°][a-zµ°0-9/^ ]*", unit):
        return None
    op = _BOUNDS[m.group("op")] if m.group("op") else None
    digits = max(_decimals(m.group("a")), _decimals(m.group("b") or ""))
    sep = m.group("sep")
    if sep == "/":
        if b is None or b == 0:
            return None
        proper = a.is_integer() and b.is_integer() and 0 <= a < b <= 100 and unit is None and op is None
        return Measure(a, unit, op, den=b, fraction=proper, digits=digits)
    if sep is not None:
        if m.group("b").startswith(("-", "+")) and sep == "-":
            return None  # "2--5": not a range anyone writes
        return Measure(a, unit, op, hi=b, digits=digits)
    return Measure(a, unit, op, digits=digits)


def _close(a: float, b: float, rel: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def _to_base(value: float, unit: str) -> float:
    dim, factor = UNITS[unit]
    if dim == "temperature" and unit in _FAHRENHEIT:
        return (value - 32.0) * factor
    return value * factor


def _same_value(va: float, ua: str | None, vb: float, ub: str | None, digits: tuple[int, int]) -> bool:
    """Two numbers with their units (see the module docstring; a unit on one side only is ignored)."""
    if ua == ub:
        return _close(va, vb)
    da, db = UNITS.get(ua or ""), UNITS.get(ub or "")
    if ua is None or ub is None:
        known = da or db
        if known is None:
            return False  # "3" vs "3 absent": only a known unit may be left out
        if known[0] == "fraction":  # "50%" vs "0.5"; never "5%" vs "5"
            pct, other = (va, vb) if ua is not None else (vb, va)
            return _close(pct * known[1], other)
        return _close(va, vb)  # "5" vs "5 cm"
    if da is None or db is None or da[0] != db[0]:
        return False
    if da[0] == "fraction":
        return _close(va, vb)
    a, b = _to_base(va, ua), _to_base(vb, ub)
    if da[0] == "temperature":
        # Rounded as written, both ways: 38.3 °C == 101 °F (100.9 and 38.33 round back), 38 °C != 101 °F.
        def rounds(base: float, unit: str, digits_: int, written: float) -> bool:
            value = base / UNITS[unit][1] + (32.0 if unit in _FAHRENHEIT else 0.0)
            return _close(round(value, digits_), written)

        return rounds(a, ub, digits[1], vb) and rounds(b, ua, digits[0], va)
    return _close(a, b, rel=1e-3)


def same_measure(a: Measure, b: Measure) -> bool:
    """Do two measures agree: same bound, same kind (value, range or ratio), values that agree."""
    if a.op != b.op:
        return False
    digits = (a.digits, b.digits)
    if a.den is not None or b.den is not None:
        if a.den is not None and b.den is not None:  # ratios part by part: 120/80 != 150/100
            return _same_value(a.value, a.unit, b.value, b.unit, digits) and _close(a.den, b.den)
        frac, other = (a, b) if a.den is not None else (b, a)
        if not frac.fraction or other.hi is not None:
            return False
        return _same_value(frac.value / frac.den, None, other.value, other.unit, digits)
    if (a.hi is None) != (b.hi is None):
        return False
    if not _same_value(a.value, a.unit, b.value, b.unit, digits):
        return False
    return a.hi is None or _same_value(a.hi, a.unit, b.hi, b.unit, digits)  # type: ignore[arg-type]


def same_quantity(a: tuple[float, str | None], b: tuple[float, str | None]) -> bool:
    """Do two parsed ``(value, unit)`` quantities agree (units converted within a dimension)?"""
    return _same_value(a[0], a[1], b[0], b[1], (9, 9))
