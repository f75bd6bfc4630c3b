"""Loaders for the text (and MedXpertQA multimodal) multiple-choice and yes/no sources.

Formats: ``medqa``, ``medmcqa``, ``pubmedqa``, ``mmlu``, ``mmlu_pro``, ``medxpertqa``,
``medbullets``, ``headqa``. Each yields one question or one quarantine row per input record.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from octomed_data.errors import SourceError
from octomed_data.schema import RecordError, TaskType, question_row
from octomed_data.sources.base import (
    LoaderContext,
    MalformedLine,
    Record,
    clean_metadata,
    input_files,
    iter_csv,
    iter_json_members,
    iter_json_records,
    load_json,
    mcq_row,
    split_answer_choices,
    text_of,
)
from octomed_data.sources.paths import SourcePath
from octomed_data.sources.readers import bad_record, has_bad_text, json_kind, scrub

JSON_PATTERNS = ("*.jsonl", "*.json")
PUBMEDQA_TRUTH = "test_ground_truth.json"


def _options_of(value: Any) -> list[tuple[str, str]]:
    """Options as given upstream: {"A": ...}, [{"letter", "content"}], or a plain list of texts."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [(str(k), "" if v is None else str(v)) for k, v in value.items()]
    if isinstance(value, list):
        if all(isinstance(o, dict) for o in value):
            return [(str(o["letter"]), "" if o.get("content") is None else str(o["content"])) for o in value]
        if all(isinstance(o, str | int | float) for o in value):
            return [(chr(ord("A") + i), str(o)) for i, o in enumerate(value)]
    raise RecordError("malformed_record", f"options in an unknown layout: {str(value)[:120]}")


def _image_refs(value: Any) -> list[str]:
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    refs = []
    for item in value:
        refs.append(item.get("image_path") or item.get("path") if isinstance(item, dict) else item)
    return [str(r) for r in refs if r]


def generic_mcq(
    ctx: LoaderContext,
    rec: dict[str, Any],
    input_file: SourcePath,
    index: int,
    split: str,
    metadata_keys: tuple[str, ...] = (),
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One record in the common "question + options + answer_idx / label" layouts.

    Handles the upstream jsonl (options dict + answer_idx + answer text), the HF/eval layouts
    (options list of {letter, content}, label ["A"]), and the MedXpertQA-eval ``*_input`` files
    whose options exist only as an "Answer Choices:" block appended to the question.
    """
    text = text_of(rec.get("question"), "question")
    given = _options_of(rec.get("options"))
    stem, parsed = split_answer_choices(text, parse=not given)
    options = given or parsed
    if not options:
        raise RecordError("too_few_options", "record has no options and no 'Answer Choices:' block")
    if "answer_idx" in rec:
        label, answer_text = rec["answer_idx"], rec.get("answer")
    elif "label" in rec:
        label, answer_text = rec["label"], None
    else:
        label, answer_text = rec.get("answer"), None  # MMLU-Pro upstream: "answer" is the letter
    refs = _image_refs(rec.get("images"))
    images, modality = ctx.images(refs, input_file) if refs else ([], None)
    meta = {k: rec.get(k) for k in metadata_keys}
    meta.update(metadata or {})
    return mcq_row(
        ctx,
        input_file=input_file,
        index=index,
        split=split,
        question=stem,
        options=options,
        answer=label,
        answer_text=answer_text if isinstance(answer_text, str) else None,
        task_type=TaskType.MM_MCQ if refs else TaskType.TEXT_MCQ,
        images=images,
        modality=modality,
        metadata=meta,
    )


def _json_mcq_loader(
    ctx: LoaderContext, path: SourcePath, default_split: str, metadata_keys: tuple[str, ...]
) -> Iterator[Record]:
    for input_file in input_files(path, JSON_PATTERNS):
        split = ctx.split_for(input_file, default_split)
        for index, rec in iter_json_records(input_file):
            if isinstance(rec, MalformedLine):
                yield ctx.quarantine(input_file, index, "malformed_json", rec.error, rec.text)
                continue
            if not isinstance(rec, dict):
                yield ctx.quarantine(
                    input_file, index, "malformed_record", "record is not a JSON object", rec
                )
                continue
            yield ctx.build(
                input_file,
                index,
                rec,
                generic_mcq,
                ctx,
                rec,
                input_file,
                index,
                split,
                metadata_keys,
            )


def load_medqa(ctx: LoaderContext, path: SourcePath) -> Iterator[Record]:
    """MedQA: upstream jsonl (4- or 5-option ``options`` dict, ``answer_idx``, ``meta_info``),
    the HuatuoGPT-o1 JSON array, and the MedXpertQA-eval ``*_input`` jsonl (``label`` + choices
    appended to the question)."""
    yield from _json_mcq_loader(ctx, path, "unknown", ("meta_info", "id"))


def load_medbullets(ctx: LoaderContext, path: SourcePath) -> Iterator[Record]:
    """MedBullets op4/op5 as packaged by MedReason (question, options, answer, answer_idx)."""
    yield from _json_mcq_loader(ctx, path, "test", ("id",))


def load_mmlu_pro(ctx: LoaderContext, path: SourcePath) -> Iterator[Record]:
    """MMLU-Pro medical: the HuatuoGPT-o1 JSON array (options dict up to 10, answer_idx) or the
    upstream layout (options list, ``answer`` letter, ``category``, ``src``)."""
    yield from _json_mcq_loader(ctx, path, "test", ("question_id", "category", "src"))


def load_medxpertqa(ctx: LoaderContext, path: SourcePath) -> Iterator[Record]:
    """MedXpertQA Text (HF jsonl: options dict, label "E") and MM / sampled ``*_input`` jsonl
    (options list, label ["A"], ``images`` resolved against ``--images``)."""
    yield from _json_mcq_loader(ctx, path, "test", ("id", "medical_task", "body_system", "question_type"))


def load_medmcqa(ctx: LoaderContext, path: SourcePath) -> Iterator[Record]:
    """MedMCQA: the official jsonl (``opa``..``opd``, 1-based ``cop``) or the MedXpertQA-eval input."""
    for input_file in input_files(path, JSON_PATTERNS):
        split = ctx.split_for(input_file, "unknown")
        for index, rec in iter_json_records(input_file):
            if isinstance(rec, MalformedLine):
                yield ctx.quarantine(input_file, index, "malformed_json", rec.error, rec.text)
                continue
            if not isinstance(rec, dict):
                yield ctx.quarantine(
                    input_file, index, "malformed_record", "record is not a JSON object", rec
                )
                continue
            yield ctx.build(input_file, index, rec, _medmcqa_row, ctx, rec, input_file, index, split)


def _medmcqa_row(
    ctx: LoaderContext, rec: dict[str, Any], input_file: SourcePath, index: int, split: str
) -> dict:
    meta = {
        "id": rec.get("id"),
        "subject": rec.get("subject_name"),
        "topic": rec.get("topic_name"),
        "choice_type": rec.get("choice_type"),
        "explanation": rec.get("exp") or rec.get("label_rationale"),
    }
    if "opa" not in rec:
        keep = {k: v for k, v in rec.items() if k not in ("subject_name", "topic_name", "label_rationale")}
        return generic_mcq(ctx, keep, input_file, index, split, metadata=meta)
    options = [(label, rec.get(key)) for label, key in zip("ABCD", ("opa", "opb", "opc", "opd"), strict=True)]
    cop = rec.get("cop")
    if cop is None or cop == "":
        raise RecordError("missing_answer", "no 'cop' (correct option)")
    try:
        cop_i = int(cop)
    except (TypeError, ValueError):
        raise RecordError("invalid_answer", f"cop {cop!r} is not a number") from None
    if not 1 <= cop_i <= 4:
        raise RecordError("invalid_answer", f"cop {cop_i} outside 1..4")
    if any(v is None for _, v in options):
        raise RecordError("empty_option", "an option is missing")
    return mcq_row(
        ctx,
        input_file=input_file,
        index=index,
        split=split,
        question=text_of(rec.get("question"), "question"),
        options=[(k, str(v)) for k, v in options],
        answer="ABCD"[cop_i - 1],
        metadata=meta,
    )


def load_mmlu(ctx: LoaderContext, path: SourcePath) -> Iterator[Record]:
    """MMLU: the header-less upstream CSVs (question, A, B, C, D, answer); subject from the file
    name (``anatomy_test.csv`` -> anatomy). A folder means all its ``*.csv``. The
    MedXpertQA-eval ``mmlu_medical_input.jsonl`` (label + appended choices) is read too."""
    for input_file in input_files(path, ("*.csv",)):
        if input_file.suffix.lower() in (".jsonl", ".json"):
            yield from _json_mcq_loader(ctx, input_file, "test", ("subject",))
            continue
        split = ctx.split_for(input_file, "unknown")
        subject = input_file.name.split(".")[0]  # anatomy_test.head5.csv -> anatomy
        for suffix in ("_test", "_dev", "_val", "_train"):
            if subject.endswith(suffix):
                subject = subject[: -len(suffix)]
        for index, row in iter_csv(input_file, header=False):
            if isinstance(row, MalformedLine):
                yield ctx.quarantine(input_file, index, "malformed_row", row.error, row.text)
                continue
            if len(row) != 6:
                yield ctx.quarantine(
                    input_file, index, "malformed_row", f"{len(row)} columns, expected 6", row
                )
                continue
            yield ctx.build(
                input_file,
                index,
                row,
                mcq_row,
                ctx,
                input_file=input_file,
                index=index,
                split=split,
                question=row[0],
                options=list(zip("ABCD", row[1:5], strict=True)),
                answer=row[5],
                metadata={"subject": subject},
            )


def load_pubmedqa(ctx: LoaderContext, path: SourcePath) -> Iterator[Record]:
    """PubMedQA ``ori_pqal.json`` (PMID -> QUESTION, CONTEXTS, final_decision): yes/no/maybe.

    The question text is the abstract sections (with their labels) followed by the question,
    since the answer depends on the context. Split: ``test`` for the PMIDs listed in
    ``test_ground_truth.json`` when that file sits beside the input, else ``train``; without it,
    ``--split`` (or ``unknown``). Given the folder, the ground-truth file is read as the split
    list only.
    """
    files = input_files(path, ("*.json",))
    if path.is_dir():
        # In a folder, the ground-truth file is the split list of its neighbour, not records.
        files = [f for f in files if f.name != PUBMEDQA_TRUTH] or files
    for input_file in files:
        if json_kind(input_file) != "object":
            raise SourceError(f"{input_file}: expected a JSON object keyed by PMID")
        test_ids: set[str] | None = None
        truth = input_file.parent / PUBMEDQA_TRUTH
        if ctx.split is None and truth != input_file and truth.exists():
            ground = load_json(truth)
            test_ids = set(ground) if isinstance(ground, dict) else None
        for index, (pmid, rec) in enumerate(iter_json_members(input_file)):
            if has_bad_text([pmid, rec]):
                bad = bad_record({pmid: rec})
                yield ctx.quarantine(input_file, index, "malformed_json", bad.error, bad.text)
                continue
            if test_ids is not None:
                split = "test" if pmid in test_ids else "train"
            else:
                split = ctx.split_for(input_file, "unknown")
            yield ctx.build(
                input_file,
                index,
                {pmid: rec},
                _pubmedqa_row,
                ctx,
                pmid,
                rec,
                input_file,
                index,
                split,
            )


def _pubmedqa_row(
    ctx: LoaderContext, pmid: str, rec: dict, input_file: SourcePath, index: int, split: str
) -> dict:
    if not isinstance(rec, dict):
        raise RecordError("malformed_record", "record is not a JSON object")
    question = text_of(rec.get("QUESTION"), "question")
    contexts = rec.get("CONTEXTS") or []
    labels = rec.get("LABELS") or []
    if not isinstance(contexts, list):
        raise RecordError("malformed_record", "CONTEXTS is not a list")
    parts = []
    for i, ctx_text in enumerate(contexts):
        label = labels[i] if i < len(labels) and labels[i] else None
        parts.append(f"{label}: {ctx_text}" if label else str(ctx_text))
    full = ("Context:\n" + "\n".join(parts) + "\n\nQuestion: " + question) if parts else question
    return question_row(
        source=ctx.source,
        split=split,
        task_type=TaskType.YES_NO_MAYBE,
        question=full,
        answer=rec.get("final_decision"),
        input_file=str(input_file),
        record_index=index,
        metadata=clean_metadata(
            {
                "pmid": pmid,
                "question_only": question,
                "year": rec.get("YEAR"),
                "meshes": rec.get("MESHES"),
                "long_answer": rec.get("LONG_ANSWER"),
            }
        ),
    )


def load_headqa(ctx: LoaderContext, path: SourcePath) -> Iterator[Record]:
    """HEAD-QA's published json: ``exams`` -> {name, year, category, data: [{qid, qtext, ra,
    image, answers: [{aid, atext}]}]}; ``ra`` is the aid of the right answer. Questions with an
    ``image`` are multimodal and resolve it against ``--images``. Record index counts questions
    across exams in file order."""
    for input_file in input_files(path, ("*.json",)):
        if json_kind(input_file) != "object":
            raise SourceError(f"{input_file}: not HEAD-QA json (no 'exams' object)")
        split = ctx.split_for(input_file, "unknown")
        index = 0
        # Streamed exam by exam: memory holds one exam, never the whole file.
        for exam_id, exam in iter_json_members(input_file, walk=("exams",)):
            data = exam.get("data") if isinstance(exam, dict) else None
            if not isinstance(data, list):
                yield ctx.quarantine(
                    input_file,
                    index,
                    "malformed_record",
                    f"exam {scrub(str(exam_id))} has no data list",
                    exam,
                )
                index += 1
                continue
            info = {k: scrub(str(exam.get(k) or "").strip()) for k in ("name", "year", "category")}
            for rec in data:
                if has_bad_text(rec) or has_bad_text(exam_id):
                    bad = bad_record(rec)
                    yield ctx.quarantine(input_file, index, "malformed_json", bad.error, bad.text)
                else:
                    yield ctx.build(
                        input_file, index, rec, _headqa_row, ctx, exam_id, info, rec, input_file, index, split
                    )
                index += 1
        if index == 0:
            raise SourceError(f"{input_file}: not HEAD-QA json (no 'exams' object with questions)")


def _headqa_row(
    ctx: LoaderContext, exam_id: str, info: dict, rec: dict, input_file: SourcePath, index: int, split: str
) -> dict:
    answers = rec["answers"]
    if not isinstance(answers, list):
        raise RecordError("malformed_record", "answers is not a list")
    by_aid = sorted(((int(a["aid"]), str(a.get("atext") or "").strip()) for a in answers), key=lambda x: x[0])
    options = [(chr(ord("A") + i), text) for i, (_, text) in enumerate(by_aid)]
    ra = rec.get("ra")
    if ra is None or str(ra).strip() == "":
        raise RecordError("missing_answer", "no 'ra' (right answer)")
    try:
        ra_i = int(str(ra).strip())
    except ValueError:
        raise RecordError("invalid_answer", f"ra {ra!r} is not an answer id") from None
    aids = [aid for aid, _ in by_aid]
    if ra_i not in aids:
        raise RecordError("answer_not_in_options", f"ra {ra_i} not among answer ids {aids}")
    image_ref = str(rec.get("image") or "").strip()
    images, modality = ctx.images([image_ref], input_file) if image_ref else ([], None)
    return mcq_row(
        ctx,
        input_file=input_file,
        index=index,
        split=split,
        question=text_of(rec.get("qtext"), "question"),
        options=options,
        answer=options[aids.index(ra_i)][0],
        task_type=TaskType.MM_MCQ if images else TaskType.TEXT_MCQ,
        images=images,
        modality=modality,
        metadata={"exam": exam_id, "qid": str(rec.get("qid") or "").strip(), **info},
    )
