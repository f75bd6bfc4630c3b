"""Evaluate a checkpoint on a question dataset: greedy generation, THE answer extraction, metrics.

``evaluate(config)`` streams QUESTION_SCHEMA Parquet (what ingest writes) batch by batch,
prompts the model the way teachers are prompted (:mod:`octomed_data.prompts`: system prompt per
task type, question and lettered options), generates greedily, reads the final answer with
:func:`octomed_data.answers.extract_answer` and scores it with :func:`~octomed_data.answers.is_correct`
(the same code that filters teacher traces, so training data and evaluation agree on what
"correct" means). It writes next to the checkpoint (or to ``output_uri``):

* ``predictions/``: one row per question (PREDICTION_SCHEMA), committed shard by shard;
* ``metrics.json``: accuracy overall and per source, reasoning length (tokens inside
  ``<think>...</think>``) per task type.

Held-out benchmarks are what this is for; keeping them out of training is the decontamination
stage's job (questions in a ``removed`` set never reach the mixture), not this module's.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from octomed_data import storage
from octomed_data.answers import extract_answer, is_correct
from octomed_data.errors import ConfigError, OctomedError
from octomed_data.prompts import PROMPT_VERSION, render_question, system_prompt
from octomed_data.schema import (
    PREDICTION_SCHEMA,
    QUESTION_SCHEMA,
    options_of,
)
from training.config import EvalConfig, load_yaml_config
from training.data import DataFile, resolve_data_files
from training.sft import CHECKPOINT_MARKER, check_model_path, is_vision_model, load_model_and_processors

log = logging.getLogger(__name__)


_THINK_SPAN = re.compile(r"<think>(.*?)(</think>|$)", re.DOTALL)


@dataclass
class EvalResult:
    """Where the evaluation went and its headline numbers."""

    output_uri: str
    metrics_uri: str
    predictions_uri: str
    questions: int
    accuracy: float | None
    per_source: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_task_type: dict[str, dict[str, Any]] = field(default_factory=dict)
    runtime_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- scoring


def reasoning_span(response: str) -> tuple[str, bool]:
    """The text inside the first ``<think>...</think>`` (to the end if never closed), and whether it closed.

    A response without ``<think>`` has no reasoning span (empty, closed).
    """
    m = _THINK_SPAN.search(response)
    if not m:
        return "", True
    return m.group(1), bool(m.group(2))


def score_response(row: Mapping[str, Any], response: str, tokenizer: Any) -> dict[str, Any]:
    """Extract and check the answer of one response; count its reasoning tokens."""
    extraction = extract_answer(response, row["task_type"], options_of(row))
    span, closed = reasoning_span(response)
    reasoning_tokens = len(tokenizer(span, add_special_tokens=False)["input_ids"]) if span else 0
    return {
        "question_id": row["question_id"],
        "source": row["source"],
        "task_type": row["task_type"],
        "gold_answer": row["answer"],
        "extracted_answer": extraction.answer,
        "extract_method": extraction.method,
        "no_answer_reason": extraction.reason,
        "correct": is_correct(extraction.answer, row["answer"], row["task_type"]),
        "response": response,
        "reasoning_tokens": reasoning_tokens,
        "think_closed": closed,
    }


class MetricsAccumulator:
    """Running counts per source and task type (constant memory in the number of questions)."""

    def __init__(self) -> None:
        self.by_source: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.by_task: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, p: Mapping[str, Any]) -> None:
        for bucket in (self.by_source[p["source"]], self.by_task[p["task_type"]]):
            bucket["n"] += 1
            bucket["correct"] += int(p["correct"])
            bucket["no_answer"] += int(p["extracted_answer"] is None)
        t = self.by_task[p["task_type"]]
        t["reasoning_tokens_sum"] += p["reasoning_tokens"]
        t["reasoning_tokens_max"] = max(t["reasoning_tokens_max"], p["reasoning_tokens"])
        t["think_unclosed"] += int(not p["think_closed"])
        t["completion_tokens_sum"] += p["completion_tokens"]

    def summary(self) -> dict[str, Any]:
        def acc(b: Mapping[str, int]) -> float | None:
            return round(b["correct"] / b["n"], 6) if b["n"] else None

        per_source = {
            s: {"n": b["n"], "correct": b["correct"], "accuracy": acc(b), "no_answer": b["no_answer"]}
            for s, b in sorted(self.by_source.items())
        }
        per_task = {
            t: {
                "n": b["n"],
                "correct": b["correct"],
                "accuracy": acc(b),
                "no_answer": b["no_answer"],
                "reasoning_tokens_mean": round(b["reasoning_tokens_sum"] / b["n"], 3) if b["n"] else None,
                "reasoning_tokens_max": b["reasoning_tokens_max"],
                "think_unclosed": b["think_unclosed"],
                "completion_tokens_mean": round(b["completion_tokens_sum"] / b["n"], 3) if b["n"] else None,
            }
            for t, b in sorted(self.by_task.items())
        }
        n = sum(b["n"] for b in self.by_source.values())
        correct = sum(b["correct"] for b in self.by_source.values())
        return {
            "questions": n,
            "correct": correct,
            "accuracy": round(correct / n, 6) if n else None,
            # Macro average: each source counts once, whatever its size.
            "macro_accuracy": round(sum(v["accuracy"] for v in per_source.values()) / len(per_source), 6)
            if per_source
            else None,
            "per_source": per_source,
            "per_task_type": per_task,
        }


# --------------------------------------------------------------------------- inputs


def resolve_checkpoint(checkpoint_uri: str, cache_dir: Path) -> Path:
    """A local folder holding the model: used in place, or downloaded from a URI (needs checkpoint.json)."""
    if "://" not in checkpoint_uri or checkpoint_uri.startswith("file://"):
        path = Path(checkpoint_uri.removeprefix("file://"))
        return check_model_path(str(path))
    marker = storage.join(checkpoint_uri, CHECKPOINT_MARKER)
    if not storage.exists(marker):
        raise ConfigError(f"no {CHECKPOINT_MARKER} at {checkpoint_uri}: not a finished checkpoint")
    fs, base = storage.filesystem(checkpoint_uri)
    local = cache_dir / "checkpoint"
    for name in storage.read_json(marker).get("files") or []:
        target = local / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fs.get_file(f"{base.rstrip('/')}/{name}", str(target))
        except Exception as exc:
            raise ConfigError(storage.describe_error(checkpoint_uri, exc)) from None
    return check_model_path(str(local))


def _selected(row: Mapping[str, Any], config: EvalConfig) -> bool:
    return (config.sources is None or row["source"] in config.sources) and (
        config.task_types is None or row["task_type"] in config.task_types
    )


def scan_questions(files: list[DataFile], config: EvalConfig) -> tuple[int, int]:
    """(questions selected, of which with images), reading only three small columns."""
    selected = with_images = 0
    for f in files:
        fs, path = storage.filesystem(f.uri)
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            missing = {"question_id", "task_type", "source", "answer"} - set(pf.schema_arrow.names)
            if missing:
                raise ConfigError(f"{f.uri} is not a question dataset: missing columns {sorted(missing)}")
            for batch in pf.iter_batches(columns=["source", "task_type", "images"], batch_size=65536):
                for row in batch.to_pylist():
                    if _selected(row, config):
                        selected += 1
                        with_images += int(bool(row["images"]))
                    if config.limit and selected >= config.limit:
                        return selected, with_images
    return selected, with_images


def iter_questions(files: list[DataFile], config: EvalConfig) -> Iterator[list[dict[str, Any]]]:
    """Selected question rows in batches of ``config.batch_size`` (streamed file by file)."""
    batch: list[dict[str, Any]] = []
    taken = 0
    columns = [f.name for f in QUESTION_SCHEMA]
    for f in files:
        fs, path = storage.filesystem(f.uri)
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            cols = [c for c in columns if c in pf.schema_arrow.names]
            for record_batch in pf.iter_batches(columns=cols, batch_size=1024):
                for row in record_batch.to_pylist():
                    if not _selected(row, config):
                        continue
                    batch.append(row)
                    taken += 1
                    if len(batch) == config.batch_size:
                        yield batch
                        batch = []
                    if config.limit and taken >= config.limit:
                        if batch:
                            yield batch
                        return
    if batch:
        yield batch


# --------------------------------------------------------------------------- generation


def chat_messages(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The teacher prompt for ``row`` as chat messages for a local model (image parts first)."""
    text = render_question(row)
    images = row.get("images") or []
    user: Any = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}] if images else text
    return [{"role": "system", "content": system_prompt(row["task_type"])}, {"role": "user", "content": user}]


class Generator:
    """Greedy batched generation with a loaded model (left padding; images through the PIL processor)."""

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, max_pixels: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_pixels = max_pixels
        self.image_token = "<|image_pad|>"

    def __call__(self, rows: list[dict[str, Any]], max_new_tokens: int) -> list[tuple[str, int, str]]:
        """(response text, completion tokens, finish reason) per row."""
        import torch

        texts = [
            self.tokenizer.apply_chat_template(chat_messages(r), tokenize=False, add_generation_prompt=True)
            for r in rows
        ]
        extra: dict[str, Any] = {}
        if any(r.get("images") for r in rows):
            texts, extra = self._with_images(rows, texts)
        self.tokenizer.padding_side = "left"  # generation continues from the right edge
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = self.model.generate(
                **enc,
                **extra,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        results = []
        for ids in new.tolist():
            eos = self.tokenizer.eos_token_id
            stopped = eos in ids
            ids = ids[: ids.index(eos)] if stopped else ids
            ids = [t for t in ids if t != self.tokenizer.pad_token_id]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            results.append((text, len(ids), "stop" if stopped else "length"))
        return results

    def _with_images(self, rows: list[dict[str, Any]], texts: list[str]) -> tuple[list[str], dict[str, Any]]:
        import io

        import torch
        from PIL import Image

        from training.data import _fit_pixels

        pil = []
        for r in rows:
            for im in r.get("images") or []:
                with Image.open(io.BytesIO(storage.read_bytes(im["uri"]))) as img:
                    pil.append(_fit_pixels(img.convert("RGB"), self.max_pixels))
        out = self.image_processor(images=pil, return_tensors="pt")
        merge = getattr(self.image_processor, "merge_size", 2) or 2
        counts = iter(int(g.prod()) // (merge * merge) for g in out["image_grid_thw"])
        expanded = []
        for text in texts:
            pieces = text.split(self.image_token)
            rebuilt = pieces[0]
            for piece in pieces[1:]:
                rebuilt += self.image_token * next(counts) + piece
            expanded.append(rebuilt)
        return expanded, {
            "pixel_values": out["pixel_values"],
            "image_grid_thw": torch.as_tensor(out["image_grid_thw"]),
        }


# --------------------------------------------------------------------------- entry point


def evaluate(config: EvalConfig, *, progress: bool = True) -> EvalResult:
    """Generate and score every selected question; write predictions + metrics.json."""
    import torch
    from tqdm import tqdm

    started = time.time()
    out_uri = config.resolved_output_uri()
    files = resolve_data_files([config.questions_uri])
    total, with_images = scan_questions(files, config)
    if total == 0:
        raise ConfigError(f"no questions selected from {config.questions_uri} (sources/task_types filters?)")
    cache_dir = Path(config.work_dir or tempfile.mkdtemp(prefix="octomed-eval-"))
    try:
        model_dir = resolve_checkpoint(config.checkpoint_uri, cache_dir)
        if with_images and not is_vision_model(model_dir):
            raise ConfigError(
                f"{with_images} of {total} selected questions have images but the checkpoint is text-only; "
                "select text task types (task_types: [text_mcq, yes_no_maybe, open_qa]) or use a VL checkpoint"
            )
        storage.ensure_writable(out_uri)
        cuda = torch.cuda.is_available()
        if config.precision in ("bf16", "fp16") and not cuda:
            raise ConfigError(f"precision {config.precision!r} needs a GPU; use 'fp32' or 'auto' on CPU")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            config.precision if config.precision != "auto" else ("bf16" if cuda else "fp32"), torch.float32
        )
        model, tokenizer, image_processor = load_model_and_processors(model_dir, torch_dtype=dtype)
        model.eval()
        if cuda:
            model.to("cuda")
        generate = Generator(model, tokenizer, image_processor, config.max_pixels)

        predictions = storage.Dataset(storage.join(out_uri, "predictions"), PREDICTION_SCHEMA)
        for name in list(predictions.manifest()):  # a re-run replaces, never mixes, predictions
            predictions.delete_shard(name)
        metrics = MetricsAccumulator()
        pending: list[dict[str, Any]] = []
        shard = 0
        bar = tqdm(total=total, desc="evaluate", unit="q", disable=not progress, file=sys.stderr)
        for rows in iter_questions(files, config):
            for row, (response, n_tokens, finish) in zip(
                rows, generate(rows, config.max_new_tokens), strict=True
            ):
                p = score_response(row, response, tokenizer)
                p.update(completion_tokens=n_tokens, finish_reason=finish)
                metrics.add(p)
                pending.append(p)
            if len(pending) >= config.shard_size:
                predictions.write_shard(shard, pending)
                shard, pending = shard + 1, []
            bar.update(len(rows))
        bar.close()
        if pending:
            predictions.write_shard(shard, pending)

        summary = metrics.summary()
        marker_uri = storage.join(config.checkpoint_uri, CHECKPOINT_MARKER)
        report = {
            **summary,
            "checkpoint_uri": config.checkpoint_uri,
            "checkpoint_step": storage.read_json(marker_uri).get("step")
            if storage.exists(marker_uri)
            else None,
            "questions_uri": config.questions_uri,
            "prompt_version": PROMPT_VERSION,
            "config": config.model_dump(),
            "runtime_s": round(time.time() - started, 3),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        metrics_uri = storage.join(out_uri, "metrics.json")
        storage.write_json(metrics_uri, report)
    finally:
        if not config.work_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return EvalResult(
        output_uri=out_uri,
        metrics_uri=metrics_uri,
        predictions_uri=predictions.uri,
        questions=summary["questions"],
        accuracy=summary["accuracy"],
        per_source=summary["per_source"],
        per_task_type=summary["per_task_type"],
        runtime_s=report["runtime_s"],
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m training.evaluate --config eval.yaml``."""
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description="Evaluate a checkpoint")
    parser.add_argument("--config", required=True, help="EvalConfig YAML (local path or URI)")
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_yaml_config(args.config, EvalConfig, {"limit": args.limit})
        result = evaluate(config, progress=not args.no_progress)
    except OctomedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
