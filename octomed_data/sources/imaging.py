"""``imaging``: labelled medical images turned into multiple-choice classification questions.

As OctoMed did for Aptos, MESSIDOR2, BCSS, brain-tumour MRI and DermaMNIST: each image
becomes "which of these classes is this?" with the true label plus distractors drawn from the
dataset's label set. Input is either a folder with one sub-folder per class, or a CSV of image
path + label (header ``path,label`` style or header-less two columns).

Sampling is class-balanced and stratified: ``per_class`` images per label, chosen with a
seeded shuffle, so the same input and seed always select the same images. Records not
selected are quarantined with reason ``not_sampled``, so records = questions + quarantined
holds here too. Only selected images are decoded.

``rest="test"`` makes the records not sampled a held-out test split instead: the sampled ones are
questions of split ``train`` (as before, same options and ids), the others questions of split
``test``, so one labelled folder gives a training source and a held-out classification benchmark
that never shares an image record with it (the lab's ``imaging_cls_lab`` benchmark reads the demo's
imaging labels this way).
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from octomed_data.errors import ConfigError, SourceError
from octomed_data.schema import TaskType
from octomed_data.sources.base import LoaderContext, MalformedLine, Record, iter_csv, mcq_row
from octomed_data.sources.paths import SourcePath

DEFAULT_TEMPLATE = "Which of the following is the correct classification of this {subject}?"
_PATH_COLUMNS = ("path", "image", "image_path", "file", "filename", "filepath", "img", "image_name")
_LABEL_COLUMNS = ("label", "class", "category", "diagnosis", "target", "level")


def _rows_from_folder(root: SourcePath) -> list[tuple[str, str]]:
    """(image path relative to ``root``, label) for every file under each class sub-folder, sorted.

    Paths stay relative to the tree (resolved against it when read): the same tree gives the
    same records, options and ids wherever it lives (a relative path, elsewhere, on s3://).
    """
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SourceError(f"{root}: no class sub-folders (expected one folder per label)")
    rows = []
    for cls in classes:
        for f in cls.files_below():
            if not f.name.startswith("."):
                rows.append((f.relative_to(root), cls.name))
    return rows


def _rows_from_csv(ctx: LoaderContext, csv_path: SourcePath) -> Iterator[tuple[int, Any]]:
    """(index, (path ref, label) | MalformedLine) from a CSV with or without a header."""
    rows = iter_csv(csv_path, header=False)
    first = next(rows, None)
    if first is None:
        return
    index, row = first
    path_col, label_col, has_header = 0, 1, False
    if isinstance(row, list):
        lowered = [c.strip().lower() for c in row]
        p = next((i for i, c in enumerate(lowered) if c in _PATH_COLUMNS), None)
        lab = next((i for i, c in enumerate(lowered) if c in _LABEL_COLUMNS), None)
        if p is not None and lab is not None:
            path_col, label_col, has_header = p, lab, True

    def pick(i: int, r: Any) -> tuple[int, Any]:
        if isinstance(r, MalformedLine):
            return i, r
        if len(r) <= max(path_col, label_col):
            return i, MalformedLine(",".join(r), f"{len(r)} columns, need path and label")
        return i, (r[path_col].strip(), r[label_col].strip())

    if not has_header:
        yield pick(index, row)
    for i, r in rows:
        # Without a header the first data row is index 0; with one, data rows start at 0 too.
        yield pick(i - 1 if has_header else i, r)


def _stable_rng(seed: int, key: str) -> random.Random:
    """A per-record RNG: the options of a record do not depend on which others were sampled."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def load_imaging(
    ctx: LoaderContext,
    path: SourcePath,
    per_class: int | str | None = None,
    seed: int | str = 0,
    num_options: int | str = 4,
    modality: str | None = None,
    anatomy: str | None = None,
    question: str | None = None,
    rest: str = "quarantine",
) -> Iterator[Record]:
    """Classification questions from a class-folder tree or a (path, label) CSV.

    Options (``--option KEY=VALUE``): ``per_class`` (images sampled per label; default all),
    ``seed`` (default 0), ``num_options`` (default 4, capped by the number of labels),
    ``modality`` / ``anatomy`` (dataset-level, used in the question when they don't give the
    answer away), ``question`` (template with ``{subject}``, e.g. "What grade of diabetic
    retinopathy does this {subject} show?"), ``rest`` (``quarantine``, the default: records not
    sampled are quarantined as ``not_sampled``; ``test``: they are questions of split ``test``).
    """
    try:
        per_class_n = None if per_class in (None, "", "all") else int(per_class)
        seed_n = int(seed)
        k = int(num_options)
    except (TypeError, ValueError):
        raise ConfigError("imaging options per_class, seed and num_options must be integers") from None
    if (per_class_n is not None and per_class_n < 1) or k < 2:
        raise ConfigError("imaging needs per_class >= 1 and num_options >= 2")
    if rest not in ("quarantine", "test"):
        raise ConfigError(f"imaging option rest must be quarantine or test, not {rest!r}")
    template = question or DEFAULT_TEMPLATE
    if "{subject}" not in template:
        raise ConfigError("imaging question template must contain {subject}")

    tree = path.is_dir()
    if tree:
        input_file = path
        records: list[tuple[int, Any]] = list(enumerate(_rows_from_folder(path)))
    elif path.is_file():
        input_file = path
        records = list(_rows_from_csv(ctx, path))  # (path, label) pairs only: small even for 100k images
    else:
        raise SourceError(f"input path does not exist: {path}")

    by_label: dict[str, list[int]] = defaultdict(list)
    for index, rec in records:
        if not isinstance(rec, MalformedLine) and rec[0] and rec[1]:
            by_label[rec[1]].append(index)
    labels = sorted(by_label)
    selected: set[int] = set()
    for label, indexes in by_label.items():
        chosen = list(indexes)
        _stable_rng(seed_n, f"sample:{label}").shuffle(chosen)
        selected.update(chosen if per_class_n is None else chosen[:per_class_n])
    split = ctx.split_for(input_file, "train")

    for index, rec in records:
        if isinstance(rec, MalformedLine):
            yield ctx.quarantine(input_file, index, "malformed_row", rec.error, rec.text)
            continue
        ref, label = rec
        raw = {"path": ref, "label": label}
        if not ref or not label:
            yield ctx.quarantine(
                input_file, index, "missing_answer" if ref else "missing_image", "empty path or label", raw
            )
            continue
        if len(labels) < 2:
            yield ctx.quarantine(
                input_file, index, "too_few_options", f"only one label in the dataset: {label}", raw
            )
            continue
        held_out = index not in selected and rest == "test"
        if index not in selected and not held_out:
            yield ctx.quarantine(
                input_file,
                index,
                "not_sampled",
                f"not among the {per_class_n} sampled for label {label}",
                raw,
            )
            continue
        yield ctx.build(
            input_file,
            index,
            raw,
            _imaging_row,
            ctx,
            input_file,
            index,
            ctx.split_for(input_file, "test") if held_out else split,
            ref,
            label,
            labels,
            k,
            seed_n,
            template,
            modality,
            anatomy,
            tree,
        )


def _imaging_row(
    ctx: LoaderContext,
    input_file: SourcePath,
    index: int,
    split: str,
    ref: str,
    label: str,
    labels: list[str],
    k: int,
    seed: int,
    template: str,
    modality: str | None,
    anatomy: str | None,
    tree: bool,
) -> dict[str, Any]:
    # A class tree holds its images (paths relative to it); a CSV's paths resolve like any
    # loader's: against --images, else the CSV's folder.
    location = input_file / ref if tree else ctx.resolve_image(ref, input_file)
    image, dicom_modality = ctx.image_at(location, ref)
    rng = _stable_rng(seed, f"options:{ref}")
    distractors = rng.sample([lab for lab in labels if lab != label], min(k, len(labels)) - 1)
    choices = [label, *distractors]
    rng.shuffle(choices)
    options = [(chr(ord("A") + i), _display(c)) for i, c in enumerate(choices)]
    answer = options[choices.index(label)][0]
    known = modality or dicom_modality
    # Never name the modality when the labels are modalities: that would give the answer away.
    label_words = {_display(lab).casefold() for lab in labels}
    mention = known if known and known.casefold() not in label_words else None
    subject = f"{mention} image" if mention else "medical image"
    return mcq_row(
        ctx,
        input_file=input_file,
        index=index,
        split=split,
        question=template.format(subject=subject),
        options=options,
        answer=answer,
        task_type=TaskType.IMAGING_CLS,
        images=[image],
        modality=known,
        anatomy=anatomy,
        metadata={"label": label, "image": ref, "labels": len(labels)},
    )


def _display(label: str) -> str:
    """Class folder names like ``glioma_tumor`` read as ``glioma tumor`` in the options."""
    return label.replace("_", " ").strip()
