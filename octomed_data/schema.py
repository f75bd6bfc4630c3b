"""The one record schema of the factory (every Arrow schema any stage writes is defined here).

* ``QUESTION_SCHEMA``: one medical question (ingest, decontamination, distillation input).
* ``QUARANTINE_SCHEMA``: an input record that could not become a question, with the reason.
* ``REMOVED_SCHEMA``: a question removed by decontamination, with the benchmark item it matched.
* ``SAMPLE_SCHEMA``: one teacher sample (reasoning trace + verdict) for one question.
* ``ACCEPTED_SCHEMA``: an accepted sample, plus the verifier's provenance (``VERIFIER_FIELDS``).
* ``RELEASE_SCHEMA``: one question of a published release with its teacher replies.

Rows are plain dicts; :func:`question_row` builds and validates a question row so every loader produces
the same shape. ``question_id`` is derived from content (source, question text, options, image hashes),
so the same question from the same source gets the same id on every run, whatever file or record index.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = "1"


class TaskType(StrEnum):
    """What kind of question a record is; decides prompt, teacher routing and answer check."""

    TEXT_MCQ = "text_mcq"  # text multiple choice (MedQA, MedMCQA, HeadQA, MMLU ...)
    MM_MCQ = "mm_mcq"  # multimodal multiple choice (PMC-VQA, MedXpertQA MM, OmniMedVQA ...)
    IMAGING_CLS = "imaging_cls"  # imaging classification turned into multiple choice
    YES_NO_MAYBE = "yes_no_maybe"  # PubMedQA-style closed answers, and closed VQA yes/no
    OPEN_VQA = "open_vqa"  # open-ended VQA answered with short normalised text
    OPEN_QA = "open_qa"  # open-ended text question (e.g. PathVQA textbook pairs), short normalised answer

    @property
    def is_multiple_choice(self) -> bool:
        return self in (TaskType.TEXT_MCQ, TaskType.MM_MCQ, TaskType.IMAGING_CLS)

    @property
    def is_multimodal(self) -> bool:
        return self in (TaskType.MM_MCQ, TaskType.IMAGING_CLS, TaskType.OPEN_VQA)


OPTION_TYPE = pa.struct([("label", pa.string()), ("text", pa.string())])

IMAGE_TYPE = pa.struct(
    [
        ("sha256", pa.string()),  # of the normalised (resized, re-encoded) bytes: the content address
        ("uri", pa.string()),  # where the normalised image is stored
        ("phash", pa.uint64()),  # 64-bit perceptual hash for near-duplicate detection
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)

QUESTION_SCHEMA = pa.schema(
    [
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("task_type", pa.string(), nullable=False),
        pa.field("modality", pa.string()),
        pa.field("anatomy", pa.string()),
        pa.field("question", pa.string(), nullable=False),
        pa.field("options", pa.list_(OPTION_TYPE), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("answer_text", pa.string()),
        pa.field("images", pa.list_(IMAGE_TYPE), nullable=False),
        pa.field("metadata", pa.string()),  # JSON object of source-specific extras (subject, ...)
        pa.field("input_file", pa.string(), nullable=False),
        pa.field("record_index", pa.int64(), nullable=False),
    ],
    metadata={"octomed.schema": "question", "octomed.schema_version": SCHEMA_VERSION},
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("input_file", pa.string(), nullable=False),
        pa.field("record_index", pa.int64(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # short machine-readable code
        pa.field("detail", pa.string()),  # human-readable explanation
        pa.field("raw", pa.string()),  # the offending record, truncated
    ],
    metadata={"octomed.schema": "quarantine", "octomed.schema_version": SCHEMA_VERSION},
)

REMOVED_SCHEMA = pa.schema(
    list(QUESTION_SCHEMA)
    + [
        # text_ngram | text_exact | image_sha256 | image_phash
        pa.field("match_kind", pa.string(), nullable=False),
        pa.field("match_benchmark", pa.string(), nullable=False),
        pa.field("match_item", pa.string(), nullable=False),  # benchmark item id
        pa.field("match_detail", pa.string()),  # the shared n-gram, or the hamming distance
    ],
    metadata={"octomed.schema": "removed", "octomed.schema_version": SCHEMA_VERSION},
)

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("task_type", pa.string(), nullable=False),
        pa.field("sample_idx", pa.int32(), nullable=False),
        pa.field("seed", pa.int64()),  # the seed the request carried; null when none was sent
        pa.field("teacher", pa.string(), nullable=False),  # teacher name from config ("sandbox": the sandbox)
        pa.field("model", pa.string(), nullable=False),
        pa.field("prompt_version", pa.string(), nullable=False),
        pa.field("params_hash", pa.string(), nullable=False),
        pa.field("reasoning", pa.string()),
        pa.field("response", pa.string()),
        pa.field("extracted_answer", pa.string()),
        pa.field("gold_answer", pa.string(), nullable=False),
        # The verdict (extracted_answer, correct, reject_reason, extraction_method) is null in ``distill/raw``
        # and set by the filter stage; ``reject_reason`` is ``request_failed`` for failed requests.
        pa.field("correct", pa.bool_()),
        pa.field("finish_reason", pa.string()),
        pa.field("reject_reason", pa.string()),  # null when correct
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("latency_s", pa.float64()),
        pa.field("attempts", pa.int32()),
        pa.field("error", pa.string()),  # last error for samples that failed after all retries
        pa.field("created_at", pa.timestamp("ms", tz="UTC")),
        pa.field("extraction_method", pa.string()),  # which answer form was read (boxed, statement, ...)
        pa.field("refusal", pa.string()),  # the server's refusal message, when it sent one
        pa.field("endpoint", pa.string()),  # the replica (base URL) that served it; a fleet has several
        pa.field("batch_id", pa.string()),  # the Batch API batch it came from; null for online requests
    ],
    metadata={"octomed.schema": "sample", "octomed.schema_version": SCHEMA_VERSION},
)

# One row per ingested source entry (the ingest stage's per-entry commit: its done-signal).
ENTRY_SCHEMA = pa.schema(
    [
        pa.field("entry", pa.string(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("input", pa.string(), nullable=False),
        pa.field("records", pa.int64(), nullable=False),
        pa.field("questions", pa.int64(), nullable=False),
        pa.field("quarantined", pa.int64(), nullable=False),
    ],
    metadata={"octomed.schema": "ingest_entry", "octomed.schema_version": SCHEMA_VERSION},
)

# The filter stage's verdict per sample (no reply text): what statistics and the report read.
VERDICT_SCHEMA = pa.schema(
    [
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("task_type", pa.string(), nullable=False),
        pa.field("sample_idx", pa.int32(), nullable=False),
        pa.field("teacher", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("extracted_answer", pa.string()),
        pa.field("extraction_method", pa.string()),
        pa.field("gold_answer", pa.string(), nullable=False),
        pa.field("correct", pa.bool_(), nullable=False),
        pa.field("reject_reason", pa.string()),  # null when correct; request_failed for failed requests
        pa.field("finish_reason", pa.string()),
        pa.field("reasoning_chars", pa.int64(), nullable=False),
        pa.field("reasoning_words", pa.int64(), nullable=False),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        # Which verifier decided ``correct`` (exact | normalized | judge; null when no answer was
        # extracted), why it matched (exact | numeric | plural | synonym | judge), and the LLM
        # judge's own verdict when it was asked (open answers in judge mode, calibration replies).
        pa.field("verifier", pa.string()),
        pa.field("verifier_rule", pa.string()),
        pa.field("judge_correct", pa.bool_()),
    ],
    metadata={"octomed.schema": "verdict", "octomed.schema_version": SCHEMA_VERSION},
)


# The verifier's provenance of a verdict: the last three VERDICT_SCHEMA fields (described there).
VERIFIER_FIELDS = ("verifier", "verifier_rule", "judge_correct")

# ``filter/accepted``: the accepted samples with their replies and the verifier's provenance.
ACCEPTED_SCHEMA = pa.schema(
    list(SAMPLE_SCHEMA) + [VERDICT_SCHEMA.field(name) for name in VERIFIER_FIELDS],
    metadata={"octomed.schema": "accepted", "octomed.schema_version": SCHEMA_VERSION},
)

# Mixture rows: one accepted trace joined with its question, split and shuffle key.
MIXTURE_SCHEMA = pa.schema(
    [
        QUESTION_SCHEMA.field("question_id"),
        QUESTION_SCHEMA.field("source"),
        QUESTION_SCHEMA.field("task_type"),
        pa.field("split", pa.string(), nullable=False),  # train | validation (of the mixture)
        QUESTION_SCHEMA.field("modality"),
        QUESTION_SCHEMA.field("question"),
        QUESTION_SCHEMA.field("options"),
        QUESTION_SCHEMA.field("images"),
        pa.field("gold_answer", pa.string(), nullable=False),
        QUESTION_SCHEMA.field("answer_text"),
        SAMPLE_SCHEMA.field("sample_idx"),
        SAMPLE_SCHEMA.field("teacher"),
        SAMPLE_SCHEMA.field("model"),
        SAMPLE_SCHEMA.field("reasoning"),
        SAMPLE_SCHEMA.field("response"),
        SAMPLE_SCHEMA.field("extracted_answer"),
        pa.field("copy", pa.int32(), nullable=False),  # >0 for extra copies when a weight is > 1
        pa.field("shuffle_key", pa.uint64(), nullable=False),
        # The verifier's provenance (null in a mixture built before it was carried, or by a builder
        # that does not pass it through): exact | normalized | judge, the rule, the judge's verdict.
        *[VERDICT_SCHEMA.field(name) for name in VERIFIER_FIELDS],
    ],
    metadata={"octomed.schema": "mixture", "octomed.schema_version": "1"},
)

# A published release (``octomed_data.release``): one row per question with its teacher replies.
# Images are referenced, never embedded: hashes plus the content-addressed path ``images/ab/<sha>.png``.
RELEASE_IMAGE_TYPE = pa.struct(
    [
        ("sha256", pa.string()),
        ("phash", pa.uint64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("path", pa.string()),  # images/<sha[:2]>/<sha>.png, as the run's image store lays it out
    ]
)
RESPONSE_TYPE = pa.struct(
    [
        ("sample_idx", pa.int32()),
        ("teacher", pa.string()),
        ("model", pa.string()),
        ("prompt_version", pa.string()),
        ("params_hash", pa.string()),
        ("seed", pa.int64()),
        ("temperature", pa.float64()),  # the teacher's sampling params (null when not recorded)
        ("top_p", pa.float64()),
        ("max_tokens", pa.int64()),
        ("extra_body", pa.string()),  # JSON of extra sampling fields sent to the endpoint
        ("reasoning", pa.string()),
        ("response", pa.string()),
        ("extracted_answer", pa.string()),
        ("extraction_method", pa.string()),
        ("correct", pa.bool_()),
        ("reject_reason", pa.string()),  # null when accepted
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("verifier", pa.string()),  # exact | normalized | judge: which verifier decided ``correct``
        ("verifier_rule", pa.string()),  # exact | numeric | plural | synonym | judge (why it matched)
        ("judge_correct", pa.bool_()),  # the LLM judge's verdict when it was asked (else null)
    ]
)
RELEASE_SCHEMA = pa.schema(
    [
        QUESTION_SCHEMA.field("question_id"),
        QUESTION_SCHEMA.field("source"),
        pa.field("source_split", pa.string(), nullable=False),  # the split the source file put it in
        QUESTION_SCHEMA.field("task_type"),
        QUESTION_SCHEMA.field("modality"),
        QUESTION_SCHEMA.field("anatomy"),
        QUESTION_SCHEMA.field("question"),
        QUESTION_SCHEMA.field("options"),
        QUESTION_SCHEMA.field("answer"),
        QUESTION_SCHEMA.field("answer_text"),
        pa.field("images", pa.list_(RELEASE_IMAGE_TYPE), nullable=False),
        pa.field("metadata", pa.string()),  # the source's extras as JSON, patient fields removed
        pa.field("source_file", pa.string(), nullable=False),  # file name only (no local path)
        QUESTION_SCHEMA.field("record_index"),
        pa.field("num_samples", pa.int32(), nullable=False),  # judged samples (failed requests excluded)
        pa.field("num_accepted", pa.int32(), nullable=False),
        pa.field("responses", pa.list_(RESPONSE_TYPE), nullable=False),
    ],
    metadata={"octomed.schema": "release", "octomed.schema_version": "1"},
)

# LLM difficulty scores (optional question filter).
SCORE_SCHEMA = pa.schema(
    [
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("task_type", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # scored | unscored | request_failed
        pa.field("score", pa.int32()),  # null unless scored
        pa.field("reason", pa.string()),  # why unscored (no_score, ambiguous, truncated, ...)
        pa.field("kept", pa.bool_()),  # within the band of the run that wrote this shard
        pa.field("grader", pa.string(), nullable=False),  # grader config name ("sandbox" for the sandbox)
        pa.field("model", pa.string(), nullable=False),
        pa.field("grading_version", pa.string(), nullable=False),
        pa.field("params_hash", pa.string(), nullable=False),
        pa.field("response", pa.string()),  # the grader's stated reason and score line
        pa.field("reasoning", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("latency_s", pa.float64()),
        pa.field("attempts", pa.int32()),
        pa.field("error", pa.string()),
        pa.field("created_at", pa.timestamp("ms", tz="UTC")),
    ],
    metadata={"octomed.schema": "difficulty_score", "octomed.schema_version": "1"},
)

# Evaluation predictions of a checkpoint, one row per benchmark item.
PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("task_type", pa.string(), nullable=False),
        pa.field("gold_answer", pa.string(), nullable=False),
        pa.field("extracted_answer", pa.string()),
        pa.field("extract_method", pa.string()),
        pa.field("no_answer_reason", pa.string()),  # why nothing was extracted (no_answer | ambiguous)
        pa.field("correct", pa.bool_(), nullable=False),
        pa.field("response", pa.string()),
        pa.field("reasoning_tokens", pa.int64(), nullable=False),  # tokens inside <think>...</think>
        pa.field("think_closed", pa.bool_(), nullable=False),  # False: ran out of tokens while thinking
        pa.field("completion_tokens", pa.int64(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),  # stop | length
        # Benchmark harness (nullable: older prediction files lack them).
        pa.field("benchmark", pa.string()),  # registry name, or the source for a question dataset
        pa.field("seed", pa.int64()),  # the protocol seed this prediction was sampled with
        pa.field("forced_end", pa.bool_()),  # thinking ran out of budget: </think> + answer cue appended
        pa.field("token_f1", pa.float64()),  # open-ended answers: token F1 against the gold
        pa.field("prompt_version", pa.string()),  # octomed-v1 (chain of thought) | octomed-direct-v1
        pa.field("error", pa.string()),  # the request failed after all retries (scored wrong)
    ],
    metadata={"octomed.schema": "prediction", "octomed.schema_version": "2"},
)

# The benchmark registry pack: held-out items decontamination matches against.
REGISTRY_SCHEMA = pa.schema(
    [
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),  # question (+ context for PubMedQA), choices cut off
        pa.field("options", pa.list_(pa.string())),  # option texts, in file order
        pa.field("image_grounded", pa.bool_(), nullable=False),  # the item is about an image (VQA, MM)
        pa.field("image_sha256", pa.string()),  # of the normalised image, as ingest stores it
        pa.field("image_phash", pa.uint64()),
        pa.field("source_file", pa.string(), nullable=False),  # every file holding this text, ";"-joined
    ],
    metadata={"octomed.schema": "benchmark_registry", "octomed.schema_version": "1"},
)


class RecordError(ValueError):
    """A single input record is invalid; the loader quarantines it with ``reason``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# C0/C1 controls (tab, newline and a CR before a newline kept) and the bidirectional-text controls;
# _ANY_CTRL (no alternation: 3x faster) finds candidates, _CTRL removes them.
_CONTROL_CHARS = "\x00-\x08\v\f\x0e-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_ANY_CTRL, _CTRL = re.compile(f"[{_CONTROL_CHARS}\r]"), re.compile(f"[{_CONTROL_CHARS}]|\r(?!\n)")


def strip_controls(text: str, tally: list[int] | None = None) -> str:
    """``text`` without control characters (NUL, ESC, bidi overrides ...); their number goes to ``tally``."""
    text, n = _CTRL.subn("", text) if _ANY_CTRL.search(text) else (text, 0)
    (tally if tally is not None else []).append(n)
    return text


def normalize_text(text: str) -> str:
    """Unicode-normalise and strip; used for ids so whitespace noise doesn't change identity."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def make_question_id(
    source: str,
    question: str,
    options: Sequence[tuple[str, str]] = (),
    image_hashes: Sequence[str] = (),
) -> str:
    """Stable content id: same source + question + options + images -> same id on every run."""
    payload = json.dumps(
        [
            source,
            normalize_text(question),
            [[k, normalize_text(v)] for k, v in options],
            sorted(image_hashes),
        ],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def question_row(
    *,
    source: str,
    split: str,
    task_type: TaskType | str,
    question: str,
    answer: str,
    input_file: str,
    record_index: int,
    options: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    answer_text: str | None = None,
    images: Sequence[Mapping[str, Any]] = (),
    modality: str | None = None,
    anatomy: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One validated question row, controls stripped (:func:`strip_controls`); else :class:`RecordError`."""
    task, cut = TaskType(task_type), []
    question = strip_controls(question, cut).strip() if isinstance(question, str) else ""
    if not question:
        raise RecordError("missing_question", "question text is empty")
    opts = list(options.items() if isinstance(options, Mapping) else (options or []))
    opts = [tuple(strip_controls(str(x), cut).strip() for x in (k, "" if v is None else v)) for k, v in opts]
    answer = "" if answer is None else strip_controls(str(answer), cut).strip()
    if not answer:
        raise RecordError("missing_answer", "gold answer is empty")
    answer_text = None if answer_text is None else strip_controls(str(answer_text), cut)
    metadata = {**(metadata or {}), "control_chars_removed": sum(cut)} if sum(cut) else metadata
    if task.is_multiple_choice:
        if len(opts) < 2:
            raise RecordError("too_few_options", f"{len(opts)} options for a multiple-choice question")
        labels = [k for k, _ in opts]
        if len(set(labels)) != len(labels):
            raise RecordError("duplicate_option_labels", ",".join(labels))
        if any(not t for _, t in opts):
            raise RecordError("empty_option", "an option has no text")
        answer = answer.upper()
        if answer not in labels:
            raise RecordError("answer_not_in_options", f"answer {answer!r} not among {labels}")
        if answer_text is None:
            answer_text = dict(opts)[answer]
    elif task == TaskType.YES_NO_MAYBE:
        answer = answer.lower()
        if answer not in ("yes", "no", "maybe"):
            raise RecordError("invalid_answer", f"{answer!r} is not yes/no/maybe")
    else:
        answer = normalize_text(answer).lower()
    if task.is_multimodal and not images:
        raise RecordError("missing_image", "a multimodal question has no image")
    image_list = [dict(im) for im in images]
    meta = json.dumps(dict(metadata), ensure_ascii=False, sort_keys=True, default=str) if metadata else None
    return {
        "question_id": make_question_id(source, question, opts, [im["sha256"] for im in image_list]),
        "source": source,
        "split": split,
        "task_type": task.value,
        "modality": modality,
        "anatomy": anatomy,
        "question": question,
        "options": [{"label": k, "text": v} for k, v in opts],
        "answer": answer,
        "answer_text": answer_text,
        "images": image_list,
        "metadata": meta,
        "input_file": input_file,
        "record_index": int(record_index),
    }


def quarantine_row(
    *, source: str, input_file: str, record_index: int, reason: str, detail: str = "", raw: Any = None
) -> dict[str, Any]:
    """Build one quarantine row. ``raw`` is stored as JSON/text, truncated to 4 kB."""
    if raw is not None and not isinstance(raw, str):
        try:
            raw = json.dumps(raw, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            raw = repr(raw)
    return {
        "source": source,
        "input_file": input_file,
        "record_index": int(record_index),
        "reason": reason,
        "detail": detail[:2000] if detail else None,
        "raw": raw[:4096] if raw else None,
    }


def options_of(row: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The ordered (label, text) options of a question row."""
    return [(o["label"], o["text"]) for o in (row.get("options") or [])]
