"""Column mappings of the ``hf`` source: which dataset column fills which question field.

A mapping is a dict (recipe YAML), a JSON object string (``--option mapping={...}``) or the name
of a ready mapping in :data:`READY_MAPPINGS` (``medmcqa``, ``medqa``, ``pmc_vqa``), optionally
with overrides (``{"base": "medqa", "answer_text": null}``). Keys:

``question`` (required), ``answer`` (required), ``options`` (a list of columns, one per option
A, B, C ..., or one column holding a list, a ``{"A": ...}`` dict or ``[{key, value}]``),
``answer_format`` (``letter``, ``index0``, ``index1``, ``text`` or ``auto``: a single letter, an
integer 0-based, anything else an option's text), ``answer_text`` (a column checked against the
chosen option), ``image`` (a column of images: ``datasets.Image`` values, bytes, or paths
resolved against ``--images`` / the input's folder; lists allowed), ``id`` and ``metadata``
(columns kept as metadata), ``task_type`` (default: multiple choice when there are options,
else yes/no/maybe or open), ``strip_option_labels`` (drop a leading ``"A:"`` from option A ...).
A column may be ``"a|b"``: the first of those the dataset has.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from octomed_data.errors import ConfigError
from octomed_data.schema import RecordError, TaskType

# The published column layouts (Hugging Face dataset viewers of each dataset).
READY_MAPPINGS: dict[str, dict[str, Any]] = {
    # openlifescienceai/medmcqa: id, question, opa..opd, cop (ClassLabel 0-3; -1 on the unlabelled
    # test split), choice_type, exp, subject_name, topic_name.
    "medmcqa": {
        "question": "question",
        "options": ["opa", "opb", "opc", "opd"],
        "answer": "cop",
        "answer_format": "index0",
        "id": "id",
        "metadata": ["subject_name", "topic_name", "choice_type", "exp"],
    },
    # GBaker/MedQA-USMLE-4-options: question, options {"A": ...}, answer_idx "A", answer (text),
    # meta_info; bigbio/med_qa (source schema): options [{key, value}], same other columns.
    "medqa": {
        "question": "question",
        "options": "options",
        "answer": "answer_idx",
        "answer_format": "letter",
        "answer_text": "answer",
        "metadata": ["meta_info"],
    },
    # xmcmic/PMC-VQA (train.csv / test.csv as a dataset): Figure_path, Question, Answer,
    # Choice A..D ("A:Diffuse uptake"), Answer_label; an ``image`` column when images are embedded.
    "pmc_vqa": {
        "question": "Question",
        "options": ["Choice A", "Choice B", "Choice C", "Choice D"],
        "answer": "Answer_label",
        "answer_format": "letter",
        "answer_text": "Answer",
        "image": "image|Figure_path",
        "metadata": ["Figure_path"],
        "strip_option_labels": True,
    },
}

_KEYS = {
    "base",
    "question",
    "options",
    "answer",
    "answer_format",
    "answer_text",
    "image",
    "id",
    "metadata",
    "task_type",
    "strip_option_labels",
}
_FORMATS = ("auto", "letter", "index0", "index1", "text")
_LABEL_PREFIX = re.compile(r"^\s*([A-Z])\s*[:.)]\s*")


@dataclass(frozen=True)
class ColumnMap:
    """A validated mapping with every column resolved against the dataset's columns."""

    question: str
    answer: str
    options: tuple[str, ...] | str | None
    answer_format: str
    answer_text: str | None
    image: str | None
    metadata: tuple[str, ...]
    task_type: TaskType | None
    strip_option_labels: bool

    @property
    def columns(self) -> list[str]:
        """The columns a row needs read (the rest of the dataset is never decoded)."""
        cols = [self.question, self.answer, *self.metadata]
        cols += (
            list(self.options) if isinstance(self.options, tuple) else [self.options] if self.options else []
        )
        cols += [c for c in (self.answer_text, self.image) if c]
        return list(dict.fromkeys(cols))


def parse_mapping(value: Any) -> dict[str, Any]:
    """The mapping as a dict: a ready name, a JSON object string, or a dict (with ``base``)."""
    if value is None or value == "":
        raise ConfigError(
            f"the hf format needs a mapping: one of {', '.join(READY_MAPPINGS)} or a dict of columns"
        )
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"mapping is not a JSON object: {exc.msg}") from None
        elif text in READY_MAPPINGS:
            return dict(READY_MAPPINGS[text])
        else:
            raise ConfigError(f"unknown mapping {text!r}; ready mappings: {', '.join(READY_MAPPINGS)}")
    if not isinstance(value, Mapping):
        raise ConfigError(f"mapping must be a name or a dict, got {type(value).__name__}")
    unknown = sorted(set(value) - _KEYS)
    if unknown:
        raise ConfigError(f"unknown mapping key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}")
    out: dict[str, Any] = {}
    if value.get("base") is not None:
        out = parse_mapping(str(value["base"]))
    out.update({k: v for k, v in value.items() if k != "base"})
    return out


def resolve_mapping(value: Any, columns: Sequence[str]) -> ColumnMap:
    """Validate ``value`` against the dataset's ``columns``; one :class:`ConfigError` line if wrong."""
    spec = parse_mapping(value)
    have = list(columns)

    def column(key: str, required: bool = False) -> str | None:
        name = spec.get(key)
        if name is None or name == "":
            if required:
                raise ConfigError(f"mapping needs {key!r} (the column holding the {key})")
            return None
        for alt in str(name).split("|"):
            if alt in have:
                return alt
        if required or key != "image":
            raise ConfigError(
                f"mapping {key}: no column {name!r} in the dataset (columns: {', '.join(have)})"
            )
        return None

    options = spec.get("options")
    if isinstance(options, list | tuple):
        opts: tuple[str, ...] | str | None = tuple(_must(str(c), have, "options") for c in options)
    else:
        opts = column("options")
    fmt = str(spec.get("answer_format") or "auto")
    if fmt not in _FORMATS:
        raise ConfigError(f"mapping answer_format {fmt!r}: one of {', '.join(_FORMATS)}")
    metadata = spec.get("metadata") or []
    if isinstance(metadata, str):
        metadata = [metadata]
    meta = tuple(c for c in (spec.get("id"), *metadata) if c)
    task = spec.get("task_type")
    try:
        task_type = TaskType(task) if task else None
    except ValueError:
        raise ConfigError(
            f"mapping task_type {task!r}: one of {', '.join(t.value for t in TaskType)}"
        ) from None
    return ColumnMap(
        question=str(column("question", required=True)),
        answer=str(column("answer", required=True)),
        options=opts,
        answer_format=fmt,
        answer_text=column("answer_text"),
        image=column("image"),
        metadata=tuple(_must(c, have, "metadata") for c in dict.fromkeys(meta) if _pick(c, have)),
        task_type=task_type,
        strip_option_labels=bool(spec.get("strip_option_labels")),
    )


def _pick(name: str, have: Sequence[str]) -> str | None:
    return next((alt for alt in str(name).split("|") if alt in have), None)


def _must(name: str, have: Sequence[str], key: str) -> str:
    found = _pick(name, have)
    if found is None:
        raise ConfigError(f"mapping {key}: no column {name!r} in the dataset (columns: {', '.join(have)})")
    return found


def options_of(value: Any, labels_from: Sequence[Any] | None, strip: bool) -> list[tuple[str, str]]:
    """(label, text) options from one column (list, dict, [{key, value}]) or option columns."""
    if labels_from is not None:
        items = [(chr(ord("A") + i), v) for i, v in enumerate(labels_from)]
    elif value is None:
        return []
    elif isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list | tuple):
        if all(isinstance(o, Mapping) for o in value):
            items = []
            for o in value:
                key = o.get("key", o.get("letter", o.get("label")))
                items.append((key, o.get("value", o.get("content", o.get("text")))))
        else:
            items = [(chr(ord("A") + i), o) for i, o in enumerate(value)]
    else:
        raise RecordError("malformed_record", f"options in an unknown layout: {str(value)[:120]}")
    out = []
    for label, text in items:
        if text is None:
            raise RecordError("empty_option", f"option {label} is missing")
        text = str(text)
        m = _LABEL_PREFIX.match(text) if strip else None
        if m and m.group(1) == str(label):
            text = text[m.end() :]
        out.append((str(label), text))
    return out


def answer_label(value: Any, fmt: str, options: list[tuple[str, str]]) -> str:
    """The gold option label from the answer column, read as ``fmt``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RecordError("missing_answer", "no gold answer")
    labels = [k for k, _ in options]
    if fmt == "auto":
        if isinstance(value, int) and not isinstance(value, bool):
            fmt = "index0"
        elif isinstance(value, str) and value.strip().upper() in labels and len(value.strip()) <= 2:
            fmt = "letter"
        else:
            fmt = "text"
    if fmt in ("index0", "index1"):
        try:
            i = int(value) - (1 if fmt == "index1" else 0)
        except (TypeError, ValueError):
            raise RecordError("invalid_answer", f"answer {value!r} is not an option number") from None
        if i < 0 and int(value) < 0:
            raise RecordError("missing_answer", f"answer {value!r} (an unlabelled record)")
        if not 0 <= i < len(labels):
            raise RecordError("answer_not_in_options", f"answer {value!r} outside the {len(labels)} options")
        return labels[i]
    if fmt == "text":
        matches = [k for k, t in options if _same(t, str(value))]
        if len(matches) != 1:
            raise RecordError("answer_not_in_options", f"answer {str(value)[:80]!r} is not one option's text")
        return matches[0]
    return str(value).strip().strip("()").rstrip(".").upper()


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold().rstrip(".") == " ".join(b.split()).casefold().rstrip(".")
