"""Export a mixture for SFT: LLaMA-Factory sharegpt and TRL conversational, both as Parquet.

Layout (every folder is self-contained: copy it anywhere, or download it from ``s3://``)::

    OUT/export.json                       settings (answer format, image references) and counts
    OUT/llamafactory/dataset_info.json    registers octomed_train / octomed_validation
    OUT/llamafactory/export.json          the same metadata, for a folder copied alone
    OUT/llamafactory/images/ab/<sha256>.png   each image once (copied or hard-linked), content-addressed
    OUT/llamafactory/{train,validation}/  rows: messages [{role, content: str}], images [path]
    OUT/trl/dataset_info.json             which configuration is for which model
    OUT/trl/README.md                     dataset card: load_dataset(OUT/trl, "text" | "vision")
    OUT/trl/text/{train,validation}/      text rows, TRL language-modelling form: string content,
                                          no images column (text-only models)
    OUT/trl/vision/{train,validation}/    every row, TRL vision form: typed content parts with one
                                          {"type": "image"} per image, images as HF Image values (VLMs)

LLaMA-Factory: the user turn starts with one ``<image>`` token per image; literal placeholders in
question or trace text are escaped, so the number of ``<image>`` tokens always equals
``len(images)``. Image paths are relative to ``OUT/llamafactory``, which LLaMA-Factory resolves
against its ``media_dir`` (default: ``dataset_dir``): pass ``dataset_dir=OUT/llamafactory``.
``llamafactory_images="absolute"`` writes the run's image URIs instead (shared filesystems only).

TRL: images are embedded PNG bytes by default (``embed_images=False``: the run's image URIs).

Side columns (both formats, every row): ``question_id``, ``source``, ``teacher`` and the verifier's
provenance of the trace, ``verifier`` (exact | normalized | judge), ``verifier_rule`` (exact |
numeric | plural | synonym | judge) and ``judge_correct`` (the LLM judge's verdict when it was
asked), so a judge-accepted trace can be told from an exact match or left out (null: the mixture
did not carry it). The trainers read ``messages`` (and ``images``) only; LLaMA-Factory's sharegpt
``columns`` name those two, and TRL drops the other columns.

Turns: the system prompt and user text the teacher saw (:mod:`octomed_data.prompts`, also what
evaluation asks), then the assistant turn ``<think>reasoning</think>`` and the teacher's response.
``answer_format="normalize"`` (default) makes every response end in the line the system prompt
asks for, ``Final answer: \\boxed{X}``: the reply's answer is read with
:func:`octomed_data.answers.extract_answer` and must be the accepted one (otherwise the row is
dropped and counted), a short final answer line is replaced, anything else gets the line appended;
the reasoning is never touched. ``"as_is"`` keeps the responses and uses a system prompt that
states no answer format. ``content="answer_only"`` (the recipe lab's direct arm: the paper's "direct
answers" training data) drops each trace's reasoning and its reply's explanation: the assistant turn is
the normalised answer line alone (no ``<think>``), under the direct system prompt that evaluation's
``direct`` protocol asks with; it needs ``answer_format="normalize"`` (the answer line is the one
normalisation writes, from the accepted answer). Every export shard mirrors one mixture shard, so exports stream with
bounded memory. :func:`load_export` loads one exported split (local or object store).
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from octomed_data import storage
from octomed_data.answers import extract_answer, is_correct
from octomed_data.errors import ConfigError, StorageError
from octomed_data.images import sha256_hex
from octomed_data.layout import ExportFolder, image_object
from octomed_data.prompts import FINAL_ANSWER_LINE, render_question, system_prompt
from octomed_data.schema import VERDICT_SCHEMA, VERIFIER_FIELDS, options_of

FORMATS = ("llamafactory", "trl")
SPLITS = ("train", "validation")
TRL_CONFIGS = ("text", "vision")
ANSWER_FORMATS = ("normalize", "as_is")
# What of a trace the assistant turn carries: the reasoning and the reply, or the answer line alone.
CONTENTS = ("reasoning", "answer_only")
IMAGE_REFS = ("relative", "absolute")
IMAGE_DIR = "images"
IMAGE_TOKEN = "<image>"
EXPORT_VERSION = "3"  # 3: the verifier's provenance as side columns
# A last line at most this long that states the reply's answer is an answer line: it is replaced
# by the normalised one. Longer lines carry explanation, so the normalised line is appended.
ANSWER_LINE_MAX_CHARS = 80
# LLaMA-Factory counts these placeholders in text; a literal one in a trace would break the
# image/token alignment, so it is rewritten to a visibly different, harmless form.
_PLACEHOLDER_ESCAPES = {"<image>": "<image\u200b>", "<video>": "<video\u200b>", "<audio>": "<audio\u200b>"}

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
LLAMAFACTORY_SCHEMA = pa.schema(
    [
        pa.field("messages", pa.list_(MESSAGE_TYPE), nullable=False),
        pa.field("images", pa.list_(pa.string()), nullable=False),
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("teacher", pa.string(), nullable=False),
        *[VERDICT_SCHEMA.field(name) for name in VERIFIER_FIELDS],
    ],
    metadata={"octomed.schema": "export.llamafactory", "octomed.schema_version": EXPORT_VERSION},
)


def _features_schema(features: Any, name: str) -> pa.Schema:
    schema = features.arrow_schema
    meta = dict(schema.metadata or {})
    meta.update({b"octomed.schema": name.encode(), b"octomed.schema_version": EXPORT_VERSION.encode()})
    return schema.with_metadata(meta)


def _trl_schemas() -> dict[str, pa.Schema]:
    """TRL schemas with HF ``features`` metadata (``load_dataset`` decodes vision images to PIL)."""
    import datasets

    meta = {
        "question_id": datasets.Value("string"),
        "source": datasets.Value("string"),
        "teacher": datasets.Value("string"),
        "verifier": datasets.Value("string"),
        "verifier_rule": datasets.Value("string"),
        "judge_correct": datasets.Value("bool"),
    }
    text = datasets.Features(
        {
            "messages": datasets.List(
                {"role": datasets.Value("string"), "content": datasets.Value("string")}
            ),
            **meta,
        }
    )
    vision = datasets.Features(
        {
            "messages": datasets.List(
                {
                    "role": datasets.Value("string"),
                    "content": datasets.List(
                        {"type": datasets.Value("string"), "text": datasets.Value("string")}
                    ),
                }
            ),
            "images": datasets.List(datasets.Image()),
            **meta,
        }
    )
    return {
        "text": _features_schema(text, "export.trl.text"),
        "vision": _features_schema(vision, "export.trl.vision"),
    }


@dataclass
class ExportResult:
    """Where each dataset and split went, and what the export did.

    ``datasets`` keys: ``llamafactory``; ``trl`` (the vision configuration: every row, for VLMs and
    the project's trainer); ``trl_text`` (the text configuration: text rows only).
    """

    uri: str
    datasets: dict[str, dict[str, str]] = field(default_factory=dict)  # dataset -> split -> URI
    rows: dict[str, dict[str, int]] = field(default_factory=dict)
    escaped_placeholders: int = 0  # literal placeholders rewritten in text (per exported row set)
    answers: dict[str, int] = field(default_factory=dict)  # kept / replaced / appended / dropped / as_is
    images: dict[str, int] = field(
        default_factory=dict
    )  # LLaMA-Factory image files: copied / linked / reused
    settings: dict[str, Any] = field(default_factory=dict)
    # Exported traces per verifier that accepted them (exact | normalized | judge | unknown: the
    # mixture did not carry it).
    verified_by: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def escape_placeholders(text: str | None) -> tuple[str, int]:
    """Rewrite literal ``<image>``/``<video>``/``<audio>`` so they are not placeholder tokens."""
    if not text:
        return text or "", 0
    n = 0
    for token, repl in _PLACEHOLDER_ESCAPES.items():
        k = text.count(token)
        if k:
            text = text.replace(token, repl)
            n += k
    return text, n


def user_text(row: Mapping[str, Any]) -> str:
    """The question exactly as the teacher saw it (and as evaluation asks it)."""
    return render_question(row)


def final_answer_line(answer: str) -> str:
    """The answer line the system prompt asks for: ``Final answer: \\boxed{answer}``."""
    return FINAL_ANSWER_LINE.format(answer=answer)


def normalize_reply(
    response: str | None,
    task_type: str,
    options: Sequence[tuple[str, str]] = (),
    accepted: str | None = None,
) -> tuple[str | None, str]:
    """``(response ending in the normalised answer line, action)``; ``(None, "dropped")`` when the
    reply does not read as ``accepted`` (the answer rejection sampling accepted).

    Actions: ``kept`` (already ends in the line), ``replaced`` (a short final answer line was
    replaced), ``appended`` (the line was added after the response).
    """
    text = (response or "").strip()
    read = extract_answer(text, task_type, options)
    answer = read.answer
    if answer is None or (accepted is not None and not is_correct(answer, accepted, task_type)):
        return None, "dropped"
    line = final_answer_line(answer)
    lines = text.split("\n")
    last = lines[-1].strip()
    if last == line:
        return text, "kept"
    attempts = []
    if len(last) <= ANSWER_LINE_MAX_CHARS:
        own = extract_answer(last, task_type, options).answer
        if own is not None and is_correct(own, answer, task_type):
            attempts.append(("\n".join([*lines[:-1], line]).strip(), "replaced"))
    attempts.append((f"{text}\n\n{line}".strip(), "appended"))
    for candidate, action in attempts:
        # The normalised reply must still read as the same answer (e.g. nothing later retracts it).
        check = extract_answer(candidate, task_type, options).answer
        if check is not None and is_correct(check, answer, task_type):
            return candidate, action
    return None, "dropped"


@dataclass
class Turns:
    """One exported conversation before it takes a framework's form."""

    system: str
    user: str  # without image tokens
    assistant: str
    images: list[dict[str, Any]]
    escaped: int
    answer: str  # kept / replaced / appended / as_is


def _check_content(content: str, answer_format: str) -> None:
    if content not in CONTENTS:
        raise ConfigError(f"unknown export content {content!r}; choose from {list(CONTENTS)}")
    if content == "answer_only" and answer_format != "normalize":
        raise ConfigError("answer_only export needs answer_format normalize (its reply is the answer line)")


def export_system_prompt(task_type: str, answer_format: str = "normalize", content: str = "reasoning") -> str:
    """The system prompt of an exported row: the teacher's (cot), or direct for answer-only data."""
    if content == "answer_only":
        return system_prompt(task_type, "direct")
    return system_prompt(task_type, answer_line=answer_format == "normalize")


def prepare(
    row: Mapping[str, Any], answer_format: str = "normalize", content: str = "reasoning"
) -> Turns | None:
    """System, user and assistant text for a mixture row; ``None`` when the row is dropped."""
    if answer_format not in ANSWER_FORMATS:
        raise ConfigError(f"unknown answer_format {answer_format!r}; choose from {list(ANSWER_FORMATS)}")
    _check_content(content, answer_format)
    response: str | None = (row.get("response") or "").strip()
    if answer_format == "normalize":
        response, action = normalize_reply(
            response, row["task_type"], options_of(row), row.get("extracted_answer")
        )
        if response is None:
            return None
    else:
        action = "as_is"
    user, n1 = escape_placeholders(user_text(row))
    if content == "answer_only":
        # The normalised reply ends in the answer line; everything before it (and the reasoning) goes.
        assistant, n2 = escape_placeholders((response or "").split("\n")[-1].strip())
    else:
        reasoning = (row.get("reasoning") or "").strip()
        assistant, n2 = escape_placeholders(f"<think>\n{reasoning}\n</think>\n\n{response}")
    return Turns(
        system=export_system_prompt(row["task_type"], answer_format, content),
        user=user,
        assistant=assistant,
        images=list(row.get("images") or []),
        escaped=n1 + n2,
        answer=action,
    )


def _meta(row: Mapping[str, Any]) -> dict[str, Any]:
    """The side columns: where the trace came from and which verifier accepted it."""
    return {"question_id": row["question_id"], "source": row["source"], "teacher": row["teacher"]} | {
        name: row.get(name) for name in VERIFIER_FIELDS
    }


def llamafactory_row(row: Mapping[str, Any], turns: Turns, image_paths: Sequence[str]) -> dict[str, Any]:
    """One sharegpt row: ``<image>`` tokens first in the user turn, one per image."""
    return {
        "messages": [
            {"role": "system", "content": turns.system},
            {"role": "user", "content": IMAGE_TOKEN * len(image_paths) + turns.user},
            {"role": "assistant", "content": turns.assistant},
        ],
        "images": list(image_paths),
    } | _meta(row)


def trl_text_row(row: Mapping[str, Any], turns: Turns) -> dict[str, Any]:
    """TRL conversational language modelling: string content, no images."""
    if turns.images:
        raise ValueError("an image row has no text-only form")
    return {
        "messages": [
            {"role": "system", "content": turns.system},
            {"role": "user", "content": turns.user},
            {"role": "assistant", "content": turns.assistant},
        ]
    } | _meta(row)


def trl_vision_row(row: Mapping[str, Any], turns: Turns, *, embed_images: bool = True) -> dict[str, Any]:
    """TRL conversational vision: typed parts, one ``{"type": "image"}`` per image, HF image values."""
    content = [{"type": "image", "text": None} for _ in turns.images] + [{"type": "text", "text": turns.user}]
    if embed_images:
        values = [
            {"bytes": storage.read_bytes(im["uri"]), "path": f"{im['sha256']}.png"} for im in turns.images
        ]
    else:
        values = [{"bytes": None, "path": im["uri"]} for im in turns.images]
    return {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": turns.system}]},
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": turns.assistant}]},
        ],
        "images": values,
    } | _meta(row)


class ImageBundle:
    """Puts each image once into ``<dataset_dir>/images/<sha[:2]>/<sha>.png`` and returns its path
    relative to ``dataset_dir``: hard-linked when source and target are on one local filesystem,
    copied otherwise (bytes checked against the content address). Memory: a bounded set of shas."""

    def __init__(self, dataset_dir: str, remember: int = 65536) -> None:
        self.dataset_dir = dataset_dir
        self.remember = remember
        self._known: OrderedDict[str, None] = OrderedDict()
        self.counts: Counter[str] = Counter()

    def path_for(self, image: Mapping[str, Any]) -> str:
        sha = image["sha256"]
        rel = f"{IMAGE_DIR}/{sha[:2]}/{sha}.png"
        if sha in self._known:
            self._known.move_to_end(sha)
            self.counts["reused"] += 1
            return rel
        target = image_object(storage.join(self.dataset_dir, IMAGE_DIR), sha)
        if storage.exists(target):
            self.counts["reused"] += 1
        elif not self._link(image["uri"], target):
            data = storage.read_bytes(image["uri"])
            if sha256_hex(data) != sha:
                raise StorageError(f"image {image['uri']} does not match its content address {sha}")
            storage.write_bytes(target, data)
            self.counts["copied"] += 1
        self._known[sha] = None
        if len(self._known) > self.remember:
            self._known.popitem(last=False)
        return rel

    def _link(self, source: str, target: str) -> bool:
        if storage.protocol_of(source) != "file" or storage.protocol_of(target) != "file":
            return False
        src, dst = source.removeprefix("file://"), target.removeprefix("file://")
        tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.{uuid.uuid4().hex}.tmp")
        try:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.link(src, tmp)
            os.replace(tmp, dst)
        except OSError:  # another device, a filesystem without hard links: copy instead
            if os.path.lexists(tmp):
                os.unlink(tmp)
            return False
        self.counts["linked"] += 1
        return True


def dataset_info(prefix: str = "octomed") -> dict[str, Any]:
    """LLaMA-Factory ``dataset_info.json`` for the two split folders next to it.

    The folders are registered as ``script_url``, not ``file_name``: for a ``file_name`` folder
    LLaMA-Factory hands *every* directory entry to ``load_dataset`` and stops with "File types
    should be identical" at the storage layer's ``_manifest/`` folder. ``script_url`` makes it
    call ``load_dataset(<folder>)``, whose file discovery reads the Parquet shards only. Relative
    image paths resolve against ``media_dir``, which defaults to this folder (``dataset_dir``).
    """
    entry = {
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
            "system_tag": "system",
        },
    }
    return {f"{prefix}_{split}": {"script_url": split, "split": "train", **entry} for split in SPLITS}


def trl_dataset_info(rows: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
    """Which TRL configuration is for which model (``OUT/trl/dataset_info.json``)."""
    return {
        "text": {
            "model": "text-only (a VLM can use it too)",
            "form": "TRL conversational language modelling: messages [{role, content: str}], no images column",
            "rows": "rows without images (image rows are only in 'vision')",
            "splits": {s: f"text/{s}" for s in SPLITS},
            "num_rows": dict(rows.get("trl_text", {})),
        },
        "vision": {
            "model": "vision-language (e.g. Qwen2.5-VL)",
            "form": "TRL conversational vision: messages [{role, content: [{type, text}]}] with one "
            "{type: image} part per image, images [HF Image]",
            "rows": "every row (text rows have no image)",
            "splits": {s: f"vision/{s}" for s in SPLITS},
            "num_rows": dict(rows.get("trl", {})),
        },
    }


def _trl_card() -> str:
    """A dataset card whose YAML lets ``datasets.load_dataset(OUT/trl, config)`` find the shards."""
    lines = ["---", "configs:"]
    for config in TRL_CONFIGS:
        lines += [f"- config_name: {config}", "  data_files:"]
        for split in SPLITS:
            lines += [f"  - split: {split}", f"    path: {config}/{split}/*.parquet"]
    lines += [
        "---",
        "",
        "# OctoMed SFT export (TRL)",
        "",
        "- `text`: text rows in TRL's conversational language-modelling form (string `content`, no",
        "  `images` column): for text-only models.",
        "- `vision`: every row in TRL's conversational vision form (typed content parts, `images`):",
        "  for vision-language models.",
        "",
        "`datasets.load_dataset(<this folder>, 'text', split='train')`; see `dataset_info.json` and `export.json`.",
        "",
    ]
    return "\n".join(lines)


def export(
    mixture_uri: str,
    out: str,
    *,
    formats: Sequence[str] | None = None,
    embed_images: bool = True,
    llamafactory_images: str = "relative",
    answer_format: str = "normalize",
    content: str = "reasoning",
    progress: bool = False,
) -> ExportResult:
    """Export every split of the mixture at ``mixture_uri`` to ``out`` (layout: module docstring)."""
    from tqdm import tqdm

    formats = list(formats or FORMATS)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ConfigError(f"unknown export format(s) {unknown}; choose from {list(FORMATS)}")
    if answer_format not in ANSWER_FORMATS:
        raise ConfigError(f"unknown answer_format {answer_format!r}; choose from {list(ANSWER_FORMATS)}")
    _check_content(content, answer_format)
    if llamafactory_images not in IMAGE_REFS:
        raise ConfigError(
            f"unknown llamafactory_images {llamafactory_images!r}; choose from {list(IMAGE_REFS)}"
        )
    t0 = time.time()
    sources = {s: storage.Dataset(storage.join(mixture_uri, s)) for s in SPLITS}
    if not any(ds.manifest() for ds in sources.values()):
        raise StorageError(f"no mixture shards under {mixture_uri} (expected train/ and validation/)")
    storage.ensure_writable(out)
    settings = {
        "export_version": EXPORT_VERSION,
        "answer_format": answer_format,
        "content": content,
        "final_answer_line": final_answer_line("X") if answer_format == "normalize" else None,
        "system_prompts": {
            t: export_system_prompt(t, answer_format, content)
            for t in ("text_mcq", "yes_no_maybe", "open_qa")
        },
        "llamafactory_images": llamafactory_images,
        "embed_images": embed_images,
    }
    result = ExportResult(uri=out, settings=settings)
    folder = ExportFolder(out)
    lf_dir, trl_dir = folder.llamafactory, folder.trl
    targets: dict[str, dict[str, storage.Dataset]] = {}
    schemas = _trl_schemas() if "trl" in formats else {}
    if "llamafactory" in formats:
        targets["llamafactory"] = {
            s: storage.Dataset(storage.join(lf_dir, s), LLAMAFACTORY_SCHEMA) for s in SPLITS
        }
    if "trl" in formats:
        targets["trl"] = {
            s: storage.Dataset(folder.trl_split(False, s), schemas["vision"]) for s in SPLITS
        }
        targets["trl_text"] = {
            s: storage.Dataset(folder.trl_split(True, s), schemas["text"]) for s in SPLITS
        }
        for s in SPLITS:  # the single-dataset layout of export version 1
            _clear(storage.Dataset(storage.join(trl_dir, s)))
    for per_split in targets.values():
        for ds in per_split.values():
            _clear(ds)
    bundle = ImageBundle(lf_dir)
    answers: Counter[str] = Counter()
    verified: Counter[str] = Counter()
    for split, src in sources.items():
        totals: Counter[str] = Counter()
        for shard in tqdm(src.manifest(), desc=f"export {split}", disable=not progress):
            out_rows: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
            for row in src.iter_rows(shards=[shard]):
                turns = prepare(row, answer_format, content)
                if turns is None:
                    answers["dropped"] += 1
                    continue
                answers[turns.answer] += 1
                verified[row.get("verifier") or "unknown"] += 1
                result.escaped_placeholders += turns.escaped
                if "llamafactory" in targets:
                    paths = [_lf_image(im, bundle, llamafactory_images) for im in turns.images]
                    out_rows["llamafactory"].append(llamafactory_row(row, turns, paths))
                if "trl" in targets:
                    out_rows["trl"].append(trl_vision_row(row, turns, embed_images=embed_images))
                    if not turns.images:
                        out_rows["trl_text"].append(trl_text_row(row, turns))
            for name, rows in out_rows.items():
                ds = targets[name][split]
                ds.write_shard(shard, pa.Table.from_pylist(rows, schema=ds.schema))
                totals[name] += len(rows)
        for name, per_split in targets.items():
            result.datasets.setdefault(name, {})[split] = per_split[split].uri
            result.rows.setdefault(name, {})[split] = totals[name]
    result.answers = dict(sorted(answers.items()))
    result.verified_by = dict(sorted(verified.items()))
    result.images = dict(sorted(bundle.counts.items()))
    result.seconds = round(time.time() - t0, 3)
    meta = {"mixture": mixture_uri} | result.to_dict()
    if "llamafactory" in formats:
        storage.write_json(folder.dataset_info(lf_dir), dataset_info())
        storage.write_json(folder.format_summary(lf_dir), meta)
    if "trl" in formats:
        storage.write_json(folder.dataset_info(trl_dir), trl_dataset_info(result.rows))
        storage.write_bytes(folder.card(trl_dir), _trl_card().encode("utf-8"))
        storage.write_json(folder.format_summary(trl_dir), meta)
    storage.write_json(folder.summary, meta)
    return result


def _lf_image(image: Mapping[str, Any], bundle: ImageBundle, mode: str) -> str:
    if mode == "relative":
        return bundle.path_for(image)
    uri = image["uri"]
    if storage.protocol_of(uri) != "file":
        raise ConfigError(
            f"llamafactory_images='absolute' needs images on a local/shared filesystem; {uri} is not "
            "(LLaMA-Factory opens image paths as local files): use 'relative'"
        )
    return uri.removeprefix("file://")


def _clear(ds: storage.Dataset) -> None:
    """Drop earlier shards so a re-export of a smaller mixture leaves no stale shard behind."""
    ds.drop_stale(keep=[])


def load_export(uri: str, **kwargs: Any):
    """``datasets.load_dataset`` over one exported split (local or object store)."""
    import datasets

    files = storage.Dataset(uri).files()
    if not files:
        raise StorageError(f"no exported shards at {uri}")
    return datasets.load_dataset(
        "parquet", data_files=files, split="train", storage_options=storage.storage_options(uri), **kwargs
    )
