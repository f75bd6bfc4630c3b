"""Loaders for the medical VQA sources: ``vqa_rad``, ``slake``, ``pathvqa``, ``omnimedvqa``, ``pmc_vqa``.

Images are resolved against ``--images`` (else the input file's folder); a record whose image
is missing or undecodable is quarantined (``missing_image`` / ``corrupt_image``), never dropped.
Closed yes/no answers become ``yes_no_maybe`` questions, other short answers ``open_vqa``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator
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
    mcq_row,
    parse_lettered_options,
    short_answer_task,
    text_of,
)
from octomed_data.sources.paths import SourcePath
from octomed_data.sources.readers import bad_record, has_bad_text, json_kind

_ORGANS = {"HEAD": "head", "CHEST": "chest", "ABD": "abdomen"}


def short_answer_row(
    ctx: LoaderContext,
    *,
    input_file: SourcePath,
    index: int,
    split: str,
    question: Any,
    answer: Any,
    image_refs: list[str],
    default_task: TaskType = TaskType.OPEN_VQA,
    modality: str | None = None,
    anatomy: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A yes/no or open short-answer question about one or more images."""
    question = text_of(question, "question")
    if answer is None or not str(answer).strip():
        raise RecordError("missing_answer", "no gold answer")
    images, dicom_modality = ctx.images(image_refs, input_file) if image_refs else ([], None)
    if default_task == TaskType.OPEN_VQA and not images:
        raise RecordError("missing_image", "a VQA record without an image")
    return question_row(
        source=ctx.source,
        split=split,
        task_type=short_answer_task(str(answer), default_task),
        question=question,
        answer=str(answer),
        answer_text=str(answer).strip(),
        input_file=str(input_file),
        record_index=index,
        images=images,
        modality=modality or dicom_modality,
        anatomy=anatomy,
        metadata=clean_metadata(metadata),
    )


def _records(
    ctx: LoaderContext, input_file: SourcePath
) -> Iterator[tuple[int, dict[str, Any] | None, Record | None]]:
    """JSON records of a file; malformed ones come back already quarantined."""
    for index, rec in iter_json_records(input_file):
        if isinstance(rec, MalformedLine):
            yield index, None, ctx.quarantine(input_file, index, "malformed_json", rec.error, rec.text)
        elif not isinstance(rec, dict):
            yield (
                index,
                None,
                ctx.quarantine(input_file, index, "malformed_record", "record is not a JSON object", rec),
            )
        else:
            yield index, rec, None


def load_vqa_rad(ctx: LoaderContext, path: SourcePath) -> Iterator[Record]:
    """VQA-RAD: the OSF ``VQA_RAD Dataset Public.json`` (split from ``phrase_type``: test_* ->
    test, freeform/para -> train) or the standard ``testset.json`` (all test). Needs ``--images``
    (the folder holding ``synpic*.jpg``)."""
    for input_file in input_files(path, ("*.json",)):
        file_split = ctx.split or (
            "test" if "test" in input_file.name.lower() and "public" not in input_file.name.lower() else None
        )
        for index, rec, bad in _records(ctx, input_file):
            if bad is not None:
                yield bad
                continue
            phrase = str(rec.get("phrase_type") or "")
            split = file_split or ("test" if phrase.startswith("test") else "train")
            yield ctx.build(input_file, index, rec, _vqa_rad_row, ctx, rec, input_file, index, split)


def _vqa_rad_row(ctx: LoaderContext, rec: dict, input_file: SourcePath, index: int, split: str) -> dict:
    organ = str(rec.get("image_organ") or "").strip().upper()
    return short_answer_row(
        ctx,
        input_file=input_file,
        index=index,
        split=split,
        question=rec.get("question"),
        answer=rec.get("answer"),
        image_refs=[rec["image_name"]],
        anatomy=_ORGANS.get(organ, organ.lower() or None),
        metadata={
            "qid": rec.get("qid"),
            "image_name": rec.get("image_name"),
            "answer_type": rec.get("answer_type"),
            "question_type": rec.get("question_type"),
            "phrase_type": rec.get("phrase_type"),
        },
    )


def load_slake(ctx: LoaderContext, path: SourcePath) -> Iterator[Record]:
    """SLAKE 1.0: ``test.json`` (en + zh; modality, location, answer_type) or the English
    ``test_open.csv`` / ``test_close.csv`` (img_id, img_name, question, answer). Images
    (``xmlab<id>/source.jpg``) resolve against ``--images``; none are bundled here, so without
    it every record is quarantined as ``missing_image``."""
    for input_file in input_files(path, ("*.json", "*.csv")):
        split = ctx.split_for(input_file, "unknown")
        if input_file.suffix.lower() == ".csv":
            closed = "clos" in input_file.name.lower()
            for index, row in iter_csv(input_file, header=True):
                if isinstance(row, MalformedLine):
                    yield ctx.quarantine(input_file, index, "malformed_row", row.error, row.text)
                    continue
                yield ctx.build(
                    input_file, index, row, _slake_csv_row, ctx, row, input_file, index, split, closed
                )
            continue
        for index, rec, bad in _records(ctx, input_file):
            if bad is not None:
                yield bad
                continue
            yield ctx.build(input_file, index, rec, _slake_row, ctx, rec, input_file, index, split)


def _slake_csv_row(
    ctx: LoaderContext, row: dict[str, str], input_file: SourcePath, index: int, split: str, closed: bool
) -> dict:
    return short_answer_row(
        ctx,
        input_file=input_file,
        index=index,
        split=split,
        question=row["question"],
        answer=row["answer"],
        image_refs=[row["img_name"]],
        metadata={"img_id": row.get("img_id"), "answer_type": "CLOSED" if closed else "OPEN", "lang": "en"},
    )


def _slake_row(ctx: LoaderContext, rec: dict, input_file: SourcePath, index: int, split: str) -> dict:
    return short_answer_row(
        ctx,
        input_file=input_file,
        index=index,
        split=split,
        question=rec.get("question"),
        answer=rec.get("answer"),
        image_refs=[rec["img_name"]],
        modality=rec.get("modality") or None,
        anatomy=(str(rec.get("location") or "").strip().lower() or None),
        metadata={
            "qid": rec.get("qid"),
            "img_id": rec.get("img_id"),
            "lang": rec.get("q_lang"),
            "answer_type": rec.get("answer_type"),
            "content_type": rec.get("content_type"),
        },
    )


def load_pathvqa(ctx: LoaderContext, path: SourcePath) -> Iterator[Record]:
    """PathVQA: the LXMERT-format split json (``img_id``, ``sentf.pvqa`` questions parallel to
    ``labelf.pvqa`` {answer: score}; one record per QA pair, images ``<img_id>.jpg`` under
    ``--images``; an image entry with no QA pair is one ``no_questions`` record), or the
    textbook ``QA_pairs_vb.json`` (Image_ID, Questions, Answers), read as text questions:
    yes/no -> yes_no_maybe, others -> open_qa. The textbook pairs are unsplit and not a
    benchmark test set, so their split defaults to ``train``."""
    for input_file in input_files(path, ("*.json",)):
        if json_kind(input_file) != "array":
            raise SourceError(f"{input_file}: expected a JSON array")
        # Streamed: the first object decides the layout, the rest follow one by one.
        items = (rec for _, rec in iter_json_members(input_file))
        head: list[Any] = []
        for rec in items:
            head.append(rec)
            if isinstance(rec, dict):
                break
        first = next((r for r in head if isinstance(r, dict)), {})
        doc = itertools.chain(head, items)
        if "sentf" in first:
            yield from _pathvqa_lxmert(ctx, input_file, doc)
        else:
            yield from _pathvqa_textbook(ctx, input_file, doc)


def _pathvqa_textbook(ctx: LoaderContext, input_file: SourcePath, doc: Iterable[Any]) -> Iterator[Record]:
    split = ctx.split_for(input_file, "train")
    for index, rec in enumerate(doc):
        if has_bad_text(rec):
            bad = bad_record(rec)
            yield ctx.quarantine(input_file, index, "malformed_json", bad.error, bad.text)
            continue
        if not isinstance(rec, dict):
            yield ctx.quarantine(input_file, index, "malformed_record", "record is not a JSON object", rec)
            continue
        yield ctx.build(
            input_file,
            index,
            rec,
            short_answer_row,
            ctx,
            input_file=input_file,
            index=index,
            split=split,
            question=rec.get("Questions"),
            answer=rec.get("Answers"),
            image_refs=[],
            default_task=TaskType.OPEN_QA,
            metadata={"figure": rec.get("Image_ID"), "origin": "textbook"},
        )


def _pathvqa_lxmert(ctx: LoaderContext, input_file: SourcePath, doc: Iterable[Any]) -> Iterator[Record]:
    """One record per QA pair, plus one quarantined record per image entry that contributes
    no pair (133 of the 991 test entries have empty lists) or has answers without questions,
    so every entry of the file is accounted for."""
    split = ctx.split_for(input_file, "unknown")
    index = 0  # one record per QA pair (or per pair-less entry), counted across image entries
    for entry_no, entry in enumerate(doc):
        if has_bad_text(entry):
            bad = bad_record(entry)
            yield ctx.quarantine(
                input_file, index, "malformed_json", f"entry {entry_no}: {bad.error}", bad.text
            )
            index += 1
            continue
        questions = labels = None
        if isinstance(entry, dict):
            sentf, labelf = entry.get("sentf") or {}, entry.get("labelf") or {}
            if isinstance(sentf, dict) and isinstance(labelf, dict):
                questions, labels = sentf.get("pvqa") or [], labelf.get("pvqa") or []
        if not isinstance(questions, list) or not isinstance(labels, list):
            yield ctx.quarantine(
                input_file, index, "malformed_record", f"entry {entry_no}: no sentf/labelf.pvqa lists", entry
            )
            index += 1
            continue
        img_id = str(entry.get("img_id") or "")
        if not questions:
            detail = f"entry {entry_no} ({img_id or 'no img_id'}) has no questions"
            reason = "malformed_record" if labels else "no_questions"
            yield ctx.quarantine(
                input_file, index, reason, detail + (f" but {len(labels)} answers" if labels else ""), entry
            )
            index += 1
            continue
        for k, question in enumerate(questions):
            label = labels[k] if k < len(labels) else None
            raw = {"img_id": img_id, "question": question, "label": label}
            yield ctx.build(
                input_file,
                index,
                raw,
                _pathvqa_pair_row,
                ctx,
                input_file,
                index,
                split,
                img_id,
                entry_no,
                k,
                question,
                label,
            )
            index += 1
        if len(labels) > len(questions):
            # Answers with no question to attach to: one record saying so, not silence.
            yield ctx.quarantine(
                input_file,
                index,
                "malformed_record",
                f"entry {entry_no} ({img_id}): {len(labels) - len(questions)} answers without a question",
                {"img_id": img_id, "labels": labels[len(questions) :]},
            )
            index += 1


def _pathvqa_pair_row(
    ctx: LoaderContext,
    input_file: SourcePath,
    index: int,
    split: str,
    img_id: str,
    entry_no: int,
    pair: int,
    question: Any,
    label: Any,
) -> dict:
    return short_answer_row(
        ctx,
        input_file=input_file,
        index=index,
        split=split,
        question=question,
        answer=_best_label(label),
        image_refs=[_pathvqa_image(ctx, input_file, img_id)],
        metadata={"img_id": img_id, "entry": entry_no, "pair": pair},
    )


def _best_label(label: Any) -> str:
    if not isinstance(label, dict) or not label:
        raise RecordError("missing_answer", "no answer for this question")
    return max(label.items(), key=lambda kv: float(kv[1]))[0]


def _pathvqa_image(ctx: LoaderContext, input_file: SourcePath, img_id: str) -> str:
    if not img_id:
        raise RecordError("missing_image", "entry has no img_id")
    for ext in (".jpg", ".png", ".jpeg"):
        if ctx.resolve_image(img_id + ext, input_file).exists():
            return img_id + ext
    return img_id + ".jpg"


_MODALITY_PREFIX = re.compile(r"^\s*([^(]+?)\s*(?:\(|$)")
_ANSWER_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.IGNORECASE | re.DOTALL)


def _subset_modality(subset: Any) -> str | None:
    """``"MR (Mag-netic Resonance Imaging)"`` -> ``"MR"``; ``"CT(Computed Tomography)"`` -> ``"CT"``."""
    if not subset:
        return None
    m = _MODALITY_PREFIX.match(str(subset))
    return m.group(1).strip() if m else None


def load_omnimedvqa(ctx: LoaderContext, path: SourcePath, modality: str | None = None) -> Iterator[Record]:
    """OmniMedVQA-derived subsets: MedVLM-R1 json (``image`` list, ``problem``, ``solution``
    letter, ``options`` list, ``answer`` text, ``subset``) and the Med-R1 split json (``image``
    string, options only inside ``problem`` as "A)x, B)y", ``solution`` "<answer> D </answer>").
    Option ``modality`` names the modality when the file does not (Med-R1 splits are per modality)."""
    for input_file in input_files(path, ("*.json",)):
        split = ctx.split_for(input_file, "test")  # OmniMedVQA is a benchmark-only dataset
        file_modality = modality or _modality_from_name(input_file)
        for index, rec, bad in _records(ctx, input_file):
            if bad is not None:
                yield bad
                continue
            yield ctx.build(
                input_file,
                index,
                rec,
                _omnimed_row,
                ctx,
                rec,
                input_file,
                index,
                split,
                file_modality,
            )


def _modality_from_name(input_file: SourcePath) -> str | None:
    stem = input_file.stem
    for suffix in ("_test", "_train", "_val", "_dev"):
        if stem.endswith(suffix):
            head = stem[: -len(suffix)]
            return head if head and "_" not in head else None
    return None


def _omnimed_row(
    ctx: LoaderContext, rec: dict, input_file: SourcePath, index: int, split: str, file_modality: str | None
) -> dict:
    problem = text_of(rec.get("problem") or rec.get("question"), "question")
    given = rec.get("options")
    if isinstance(given, list) and given:
        options = [(chr(ord("A") + i), str(o)) for i, o in enumerate(given)]
        question = str(rec.get("question") or parse_lettered_options(problem, "suffix")[0])
    else:
        question, options = parse_lettered_options(problem, "suffix")
    solution = str(rec.get("solution") or "")
    tagged = _ANSWER_TAG.search(solution)
    label = tagged.group(1) if tagged else solution
    refs = rec.get("image")
    refs = [refs] if isinstance(refs, str) else list(refs or [])
    images, dicom_modality = ctx.images(refs, input_file)
    return mcq_row(
        ctx,
        input_file=input_file,
        index=index,
        split=split,
        question=question,
        options=options,
        answer=label,
        answer_text=rec.get("answer") if isinstance(rec.get("answer"), str) else None,
        task_type=TaskType.MM_MCQ,
        images=images,
        modality=_subset_modality(rec.get("subset")) or file_modality or dicom_modality,
        metadata={
            "dataset": rec.get("dataset"),
            "subset": rec.get("subset"),
            "image": refs[0] if refs else None,
        },
    )


_CHOICE_PREFIX = re.compile(r"^\s*([A-Z])\s*[:.)]\s*")


def load_pmc_vqa(ctx: LoaderContext, path: SourcePath) -> Iterator[Record]:
    """PMC-VQA's published CSVs (train.csv / test.csv / test_clean.csv): ``Figure_path``,
    ``Question``, ``Answer``, ``Choice A``..``Choice D`` (values like ``"A:Diffuse uptake"``),
    ``Answer_label``; extra columns (index, Caption, split) are kept as metadata. Images
    (``PMC1064097_F1.jpg``) resolve against ``--images``."""
    for input_file in input_files(path, ("*.csv",)):
        split = ctx.split_for(input_file, "unknown")
        for index, row in iter_csv(input_file, header=True):
            if isinstance(row, MalformedLine):
                yield ctx.quarantine(input_file, index, "malformed_row", row.error, row.text)
                continue
            if index == 0 and not {"Figure_path", "Question", "Answer_label"} <= set(row):
                raise SourceError(f"{input_file}: not a PMC-VQA CSV (columns: {', '.join(row)})")
            yield ctx.build(input_file, index, row, _pmc_row, ctx, row, input_file, index, split)


def _pmc_row(ctx: LoaderContext, row: dict[str, str], input_file: SourcePath, index: int, split: str) -> dict:
    options = []
    for label in "ABCDEFGH":
        value = row.get(f"Choice {label}")
        if value is None:
            break
        m = _CHOICE_PREFIX.match(value)
        if m and m.group(1) != label:
            raise RecordError("malformed_record", f"Choice {label} is labelled {m.group(1)}")
        options.append((label, value[m.end() :] if m else value))
    images, dicom_modality = ctx.images([row["Figure_path"]], input_file)
    extra = {k: v for k, v in row.items() if k not in ("Figure_path", "Question", "Answer", "Answer_label")}
    extra = {k: v for k, v in extra.items() if not k.startswith("Choice ")}
    return mcq_row(
        ctx,
        input_file=input_file,
        index=index,
        split=split,
        question=row["Question"],
        options=options,
        answer=row["Answer_label"],
        answer_text=row.get("Answer"),
        task_type=TaskType.MM_MCQ,
        images=images,
        modality=dicom_modality,
        metadata={"figure": row["Figure_path"], **extra},
    )
