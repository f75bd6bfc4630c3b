"""An answer's tokens for :mod:`.match`: what punctuation means in medicine is kept, the rest dropped.

Kept: signs ("HER2+" -> "positive", "Rh-" -> "negative", "-2.5"), ranges ("2-5", "L2-3", "2 to 5"),
bounds ("<", "≤", "less than", "at least": only before a number), ratios ("120/80"), "*" ("T2*" ->
"star"), "%", and a letter that is part of a name ("hepatitis A", "type A"). Dropped: case, "the",
"an", the article "a", hyphens between words, other punctuation. Each token keeps its text as written
(abbreviations are read case-sensitively).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from octomed_data.verify.quantity import NUMBER_WORDS, ORDINAL_WORDS, UNITS, WORD_BOUNDS
from octomed_data.verify.vocab import american

NEGATION_CUES = frozenset(
    "no not without absent absence negative none nothing nil never cannot neither nor".split()
)
_NAMED = frozenset(  # a letter after these is part of the name: "hepatitis a", "type a", "vitamin a"
    "hepatitis vitamin type group class factor grade stage zone phase influenza protein lead complex "
    "category cluster blood fraction".split()
)
_ROMAN = {r: i for i, r in enumerate("i ii iii iv v vi vii viii ix x xi xii".split(), start=1)}
ROMAN_CONTEXT = frozenset(
    "grade stage type class classe phase group level nerve cn factor tanner bosniak category lead zone".split()
)
# "5cm" -> "5 cm"; one-letter units stay glued ("2F" is Bosniak 2F, "3a" a stage).
_UNIT_WORDS = sorted(
    (u for u in UNITS if (u.isalpha() and len(u) > 1) or u.startswith("°")), key=len, reverse=True
)
_SPLIT_UNIT = re.compile(rf"(?<=\d)(?=(?:{'|'.join(map(re.escape, _UNIT_WORDS))})\b)", re.IGNORECASE)
_BOUND_WORDS = re.compile(
    rf"\b({'|'.join(sorted(map(re.escape, WORD_BOUNDS), key=len, reverse=True))})"
    r"\s+(?=[-+]?\.?\d)(?![-+]?[\d.]*(?:st|nd|rd|th)\b)",  # a bound on a number, not "below 7th rib"
    re.IGNORECASE,
)
_TOKEN = re.compile(
    r"(?P<cmp><=|>=|<|>)"
    r"|(?P<num>(?<![\w.])[-+]?(?:\d+\.\d+|\.\d+|\d+)(?![\w.]))"
    r"|(?P<word>[^\W_]+)"
    r"|(?P<sym>[%*°/+\-])"
)
_DASHES = str.maketrans({"–": "-", "—": "-", "−": "-", "‐": "-", "‑": "-", "×": "x", "’": "'"})


@dataclass(frozen=True)
class Tok:
    norm: str  # what the rules compare ("" once dropped)
    orig: str  # as written (abbreviations are read case-sensitively)


def _number_token(text: str) -> str:
    value = float(text)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else format(value, ".12g")


def tokenize(text: str) -> list[Tok]:
    """An answer's tokens; see the module docstring for what is kept."""
    t = unicodedata.normalize("NFKC", text).replace("≤", "<=").replace("≥", ">=").translate(_DASHES)
    t = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", t)  # 1,000
    t = re.sub(r"n't\b", " not", t, flags=re.IGNORECASE)
    t = _BOUND_WORDS.sub(lambda m: f" {WORD_BOUNDS[m.group(1).lower()]} ", t)
    t = re.sub(r"\bbetween\s+([-+]?[\d.]+)\s+and\s+(?=[-+]?\.?\d)", r"\1 - ", t, flags=re.IGNORECASE)
    t = re.sub(r"(?<=\d)\s+to\s+(?=[-+]?\.?\d)", " - ", t, flags=re.IGNORECASE)
    t = re.sub(r"(?<=\d)\s*x\s*(?=\d)", " x ", t, flags=re.IGNORECASE)  # 2x3 cm
    t = _SPLIT_UNIT.sub(" ", t)  # 5cm -> 5 cm
    raw = [(m.lastgroup, m.group(0), m.start(), m.end()) for m in _TOKEN.finditer(t)]
    out: list[Tok] = []
    for i, (kind, s, start, end) in enumerate(raw):
        prev = raw[i - 1] if i else None
        nxt = raw[i + 1] if i + 1 < len(raw) else None
        after = t[end : end + 1]
        if kind == "cmp":
            out.append(Tok(s, s))
        elif kind == "num":
            out.append(Tok(_number_token(s), s))
        elif kind == "word":
            out.append(Tok(s.lower(), s))
        elif s == "-":
            glued_before = prev is not None and prev[3] == start
            if prev and nxt and any(c.isdigit() for c in prev[1]) and any(c.isdigit() for c in nxt[1]):
                out.append(Tok("-", s))  # a range: 2-5, L2-3, C5-C6
            elif glued_before and prev[0] in ("word", "num") and not after.isalnum():
                out.append(Tok("negative", s))  # HER2-, Rh-
        elif s == "+":
            if prev is not None and prev[3] == start and prev[0] in ("word", "num") and not after.isalnum():
                out.append(Tok("positive", s))  # HER2+, Rh+, 3+
            elif prev is not None and nxt is not None:
                out.append(Tok("plus", s))  # MRI+DWI
        elif s == "*":
            out.append(Tok("star", s))  # T2*
        elif s == "%":
            out.append(Tok("%", s))
        elif s == "°":
            if nxt and nxt[0] == "word" and nxt[1].lower() in ("c", "f") and nxt[2] <= end + 1:
                continue  # read with the unit below
            out.append(Tok("degree", s))
        elif s == "/":
            if prev and nxt and prev[0] == "num" and nxt[0] == "num":
                out.append(Tok("/", s))  # a ratio: 120/80
    return _drop_articles(out)


def _drop_articles(toks: list[Tok]) -> list[Tok]:
    """Drop "the", "an" and the article "a", but not a letter that is part of a name ("hepatitis A")."""
    out: list[Tok] = []
    for i, tok in enumerate(toks):
        if tok.norm in ("the", "an"):
            continue
        if tok.norm == "a":
            prev = out[-1].norm if out else None
            nxt = toks[i + 1] if i + 1 < len(toks) else None
            named = prev in _NAMED or (tok.orig == "A" and prev is not None)
            if not named and nxt is not None and (tok.orig == "a" or nxt.orig[:1].islower()):
                continue
            if not named and nxt is None and tok.orig == "a" and prev is None:
                continue
        out.append(tok)
    return out


def stem(word: str) -> str:
    """A plural ending dropped ("kidneys" -> "kidney", "arteries" -> "artery"); short words kept."""
    if not word.isalpha():
        return word
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def numerals(norms: list[str]) -> list[str]:
    """Number words and grading numerals as digits: "twenty five" -> "25", "grade II" -> "grade 2"."""
    out: list[str] = []
    i = 0
    while i < len(norms):
        w = norms[i]
        nxt = norms[i + 1] if i + 1 < len(norms) else None
        tens = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70}
        if w in tens and nxt in NUMBER_WORDS and NUMBER_WORDS[nxt] < 10:
            out.append(str(tens[w] + NUMBER_WORDS[nxt]))
            i += 2
            continue
        if w in NUMBER_WORDS:
            w = str(NUMBER_WORDS[w])
        elif w in ORDINAL_WORDS:
            n = ORDINAL_WORDS[w]
            w = f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"
        elif out and out[-1] in ROMAN_CONTEXT:
            m = re.fullmatch(r"(i{1,3}|iv|vi{0,3}|ix|xi{0,2})([a-f]?)", w)
            if m and m.group(1) in _ROMAN:
                w = f"{_ROMAN[m.group(1)]}{m.group(2)}"
        out.append(w)
        i += 1
    return out


def spell(word: str) -> str:
    return stem(american(word)) if word.isalpha() else word


_PAREN = re.compile(r"^(?P<phrase>[^()]+?)\s*\((?P<abbr>[A-Za-z][A-Za-z0-9 ]{0,10})\)\s*$")


def strip_parenthetical(text: str) -> str:
    """ "Diffusion weighted imaging (DWI)" -> the phrase, when the parenthesis is its initialism."""
    m = _PAREN.match(text.strip().rstrip("."))
    if m is None:
        return text
    phrase, abbr = m.group("phrase"), m.group("abbr").replace(" ", "")
    initials = "".join(w[0] for w in re.findall(r"[A-Za-z]+", phrase))
    if abbr.isupper() and initials.lower() == abbr.lower():
        return phrase
    return text
