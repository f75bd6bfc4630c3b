"""The evaluation harness: a model on held-out medical benchmarks under the OctoMed protocol.

``evaluate(config)`` takes questions from the benchmark registry
(:mod:`evaluation.benchmarks`, read with the existing source loaders) or from a
QUESTION_SCHEMA dataset, asks a backend (:mod:`evaluation.backends`: ``hf``, ``openai``,
``vllm``) for replies under every protocol seed (temperature 0.6, top-p 0.95, 5 seeds, up to
8192 new tokens, end of thinking forced at the budget by default), reads each answer with THE
extraction module (:func:`octomed_data.answers.extract_answer`; unparseable = wrong, counted,
never guessed) and scores it (:func:`~octomed_data.answers.is_correct`, plus token F1 for
open-ended answers). Items are streamed batch by batch; nothing holds a whole benchmark.

Output under ``output_uri`` (local or ``s3://``, through :mod:`octomed_data.storage`):

* ``predictions/``: one PREDICTION_SCHEMA row per (item, seed), committed in shards per benchmark;
* ``metrics.json``: per benchmark accuracy mean ± std over seeds, parse-failure rate, request
  errors, items evaluated / skipped (by reason), token F1, mean reasoning tokens, forced-end
  counts; per task type reasoning length; the protocol, the sampling settings in effect and the
  backend (no secrets);

A reply whose request failed is scored wrong, so the run fails with one line when more than
``max_request_error_rate`` of the replies had a request error (:class:`TooManyRequestErrors`):
numbers from a flaky endpoint are not a model's accuracy. Malformed rows of a question dataset
(unknown task type, no question/answer, bad options or images) are skipped and counted by reason.
* ``reasoning_length.png``: mean reasoning tokens per task type and per benchmark;
* ``report.md``: the table beside the paper's OctoMed-7B numbers.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from evaluation.backends import (
    Backend,
    Generation,
    SamplingProtocol,
    auto_backend,
    chat_messages,
    make_backend,
    reasoning_span,
)
from evaluation.benchmarks import (
    BENCHMARKS,
    LoadStats,
    benchmark_files,
    get_benchmarks,
    iter_benchmark,
    resolve_data_dir,
)
from evaluation.report import MetricsAccumulator, macro_accuracy, reasoning_length_png, report_markdown
from octomed_data import storage
from octomed_data.answers import extract_answer, is_correct, token_f1
from octomed_data.errors import ConfigError, OctomedError
from octomed_data.images import ImageStore
from octomed_data.job_config import EvalConfig
from octomed_data.layout import EvaluationFolder
from octomed_data.prompts import prompt_version
from octomed_data.schema import PREDICTION_SCHEMA, QUESTION_SCHEMA, TaskType, options_of
from training.data import DataFile, resolve_data_files

__all__ = ["EvalResult", "chat_messages", "evaluate", "reasoning_span", "score_generation"]

log = logging.getLogger(__name__)

TEXT_ONLY_MODEL = "text_only_model"  # skip reason: an image question for a model without vision
NO_SOURCE = "(no source)"  # where a question row without a source is counted


class TooManyRequestErrors(OctomedError):
    """More replies than ``max_request_error_rate`` allows had a failed request."""


class RequestErrorBudget:
    """Counts replies with a request error and fails the run past ``max_rate`` (one clear line).

    Checked after every batch once ``min_count`` replies are in (a dead endpoint stops the run
    early), and on the whole run at the end whatever its size.
    """

    def __init__(self, max_rate: float, min_count: int) -> None:
        self.max_rate = max_rate
        self.min_count = min_count
        self.replies = 0
        self.errors = 0
        self.first_error: str | None = None

    def add(self, gens: list[Generation]) -> None:
        """Count a batch of replies; raise :class:`TooManyRequestErrors` past the threshold."""
        for g in gens:
            self.replies += 1
            if g.error is not None:
                self.errors += 1
                self.first_error = self.first_error or g.error
        if self.replies >= self.min_count:
            self.check()

    def rate(self) -> float:
        return self.errors / self.replies if self.replies else 0.0

    def check(self) -> None:
        """Raise when the error rate so far is above ``max_rate``."""
        if not self.errors or self.rate() <= self.max_rate:
            return
        first = (self.first_error or "").splitlines()[0][:300] if self.first_error else "?"
        hint = ""
        if (
            "unrecognized request argument" in first.lower()
            or "extra inputs are not permitted" in first.lower()
        ):
            hint = "; the endpoint rejects non-OpenAI fields: set sampling_extras: off"
        raise TooManyRequestErrors(
            f"{self.errors} of {self.replies} replies had a request error ({self.rate():.1%} > "
            f"max_request_error_rate {self.max_rate:.1%}); first: {first}{hint}"
        )


@dataclass
class EvalResult:
    """Where the evaluation went and its headline numbers."""

    output_uri: str
    metrics_uri: str
    predictions_uri: str
    report_uri: str
    plot_uri: str
    items: int  # distinct items evaluated (each under every seed)
    predictions: int
    macro_accuracy: float | None
    per_benchmark: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_task_type: dict[str, dict[str, Any]] = field(default_factory=dict)
    runtime_s: float = 0.0
    request_errors: int = 0  # replies whose request failed (scored wrong)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- scoring


def score_generation(
    row: Mapping[str, Any], gen: Generation, *, benchmark: str, seed: int, version: str
) -> dict[str, Any]:
    """One PREDICTION_SCHEMA row: THE extraction on the full reply, correctness, token F1 for open answers."""
    task = TaskType(row["task_type"])
    extraction = extract_answer(gen.text, task, options_of(row))
    _, closed = reasoning_span(gen.text)
    open_answer = task in (TaskType.OPEN_VQA, TaskType.OPEN_QA)
    return {
        "question_id": row["question_id"],
        "source": row["source"],
        "task_type": task.value,
        "gold_answer": row["answer"],
        "extracted_answer": extraction.answer,
        "extract_method": extraction.method,
        "no_answer_reason": extraction.reason,
        "correct": is_correct(extraction.answer, row["answer"], task),
        "response": gen.text,
        "reasoning_tokens": int(gen.reasoning_tokens),
        "think_closed": closed,
        "completion_tokens": int(gen.completion_tokens),
        "finish_reason": gen.finish_reason,
        "benchmark": benchmark,
        "seed": seed,
        "forced_end": gen.forced_end,
        "token_f1": token_f1(extraction.answer, row["answer"]) if open_answer else None,
        "prompt_version": version,
        "error": gen.error,
    }


# --------------------------------------------------------------------------- question datasets


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
            missing = {"question_id", "task_type", "source", "question", "answer"} - set(
                pf.schema_arrow.names
            )
            if missing:
                raise ConfigError(f"{f.uri} is not a question dataset: missing columns {sorted(missing)}")
            # A dataset without an images column has no image questions.
            cols = [c for c in ("source", "task_type", "images") if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(columns=cols, batch_size=65536):
                for row in batch.to_pylist():
                    if _selected(row, config):
                        selected += 1
                        with_images += int(bool(row.get("images")))
                    if config.limit and selected >= config.limit:
                        return selected, with_images
    return selected, with_images


def question_problem(row: dict[str, Any]) -> str | None:
    """Why a question row cannot be asked and scored (a skip reason), or None when it can.

    Normalises in place what has a safe reading: no ``images`` / ``options`` value -> none.
    """
    if not row.get("question_id"):
        return "missing_question_id"
    if not row.get("source"):
        return "missing_source"
    try:
        task = TaskType(row.get("task_type"))
    except ValueError:
        return "unknown_task_type"
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        return "missing_question"
    if row.get("answer") is None or not str(row["answer"]).strip():
        return "missing_answer"
    row["options"] = row.get("options") or []
    row["images"] = row.get("images") or []
    if any(
        not isinstance(o, Mapping) or o.get("label") is None or o.get("text") is None for o in row["options"]
    ):
        return "malformed_options"
    if task.is_multiple_choice and not row["options"]:
        return "missing_options"  # nothing to choose from: the answer could not be read
    if any(not isinstance(im, Mapping) or not im.get("uri") for im in row["images"]):
        return "malformed_images"
    return None


def iter_questions(
    files: list[DataFile], config: EvalConfig, on_skip: Callable[[str, str], None] | None = None
) -> Iterator[dict[str, Any]]:
    """Selected, valid question rows of a dataset, streamed file by file (at most ``config.limit``).

    A selected row that cannot be asked (:func:`question_problem`) is not yielded:
    ``on_skip(source, reason)`` counts it and the run goes on.
    """
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
                    problem = question_problem(row)
                    if problem is not None:
                        if on_skip is not None:
                            on_skip(row.get("source") or NO_SOURCE, problem)
                        continue
                    yield row
                    taken += 1
                    if config.limit and taken >= config.limit:
                        return


# --------------------------------------------------------------------------- the run


class _PredictionWriter:
    """Buffers prediction rows per benchmark and commits a shard every ``shard_size`` rows."""

    def __init__(self, uri: str, shard_size: int) -> None:
        self.dataset = storage.Dataset(uri, PREDICTION_SCHEMA)
        self.shard_size = shard_size
        self.pending: list[dict[str, Any]] = []
        self.shards: Counter = Counter()
        self.rows = 0
        self.dataset.drop_stale(keep=[])  # a re-run replaces, never mixes, predictions

    def add(self, benchmark: str, row: dict[str, Any]) -> None:
        self.pending.append(row)
        if len(self.pending) >= self.shard_size:
            self.flush(benchmark)

    def flush(self, benchmark: str) -> None:
        if not self.pending:
            return
        safe = "".join(ch if ch.isalnum() or ch in "_.-" else "_" for ch in benchmark) or "x"
        self.dataset.write_shard(f"{safe}-{self.shards[safe]:05d}", self.pending)
        self.shards[safe] += 1
        self.rows += len(self.pending)
        self.pending = []


def _batches(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _protocol(config: EvalConfig) -> SamplingProtocol:
    """The sampling protocol; ``direct`` prompting never opens a reply with ``<think>`` (no reasoning
    is asked for, so a ``prefill_think`` meant for chain-of-thought runs does not apply)."""
    return SamplingProtocol(
        temperature=config.temperature,
        top_p=config.top_p,
        max_new_tokens=config.max_new_tokens,
        force_end=config.force_end_of_thinking,
        force_tokens=config.force_answer_tokens,
        prompting=config.prompting,
        prefill_think=config.prefill_think and config.prompting == "cot",
    )


def _backend_options(config: EvalConfig) -> dict[str, Any]:
    return {
        "hf": {
            "precision": config.precision,
            "max_pixels": config.max_pixels,
            "batch_size": config.batch_size,
        },
        "openai": {
            "served_model_name": config.served_model_name,
            "api_key_env": config.api_key_env,
            "concurrency": config.max_in_flight,
            "timeout_s": config.timeout_s,
            "extra_body": config.extra_body,
            "sampling_extras": config.sampling_extras,
            "server": config.server,
        },
        "vllm": {"concurrency": max(config.max_in_flight, 64)},
    }


def evaluate(config: EvalConfig, *, progress: bool = True) -> EvalResult:
    """Generate and score every selected item under every seed; write predictions, metrics, plot, report."""
    from tqdm import tqdm

    started = time.time()
    out_uri = config.resolved_output_uri()
    kind = auto_backend(config.model, config.backend)
    seeds = [config.seed + i for i in range(config.seeds)]
    version = prompt_version(config.prompting)

    # Inputs first: a wrong name or a missing file is reported before any model is loaded.
    files: list[DataFile] = []
    specs = []
    if config.benchmarks:
        specs = get_benchmarks(config.benchmarks)
        data_dir = resolve_data_dir(config.data_dir)
        for spec in specs:
            benchmark_files(spec, data_dir)
        total = len(specs) * config.limit if config.limit else None
        with_images = 0
    else:
        files = resolve_data_files([config.questions_uri or ""])
        total, with_images = scan_questions(files, config)
        if total == 0:
            raise ConfigError(
                f"no questions selected from {config.questions_uri} (sources/task_types filters?)"
            )

    cache_dir = Path(config.work_dir or tempfile.mkdtemp(prefix="octomed-eval-"))
    backend: Backend | None = None
    protocol_in_effect = _protocol(config)
    try:
        backend = make_backend(
            kind, config.model, protocol_in_effect, options=_backend_options(config), cache_dir=cache_dir
        )
        if with_images and not backend.supports_images:
            raise ConfigError(
                f"{with_images} of {total} selected questions have images but the checkpoint is text-only; "
                "select text task types (task_types: [text_mcq, yes_no_maybe, open_qa]) or use a VL checkpoint"
            )
        storage.ensure_writable(out_uri)
        writer = _PredictionWriter(EvaluationFolder(out_uri).predictions, config.shard_size)
        metrics = MetricsAccumulator()
        budget = RequestErrorBudget(config.max_request_error_rate, config.request_error_min_count)
        loads: dict[str, LoadStats] = {}
        step = config.batch_size if kind != "openai" else max(1, config.max_in_flight)
        bar = tqdm(total=total, desc="eval", unit="item", disable=not progress, file=sys.stderr)

        def run_rows(name: str, rows: Iterator[dict[str, Any]], stats: LoadStats) -> None:
            for batch in _batches(rows, step):
                if not backend.supports_images:
                    kept = [r for r in batch if not r.get("images")]
                    stats.skipped[TEXT_ONLY_MODEL] += len(batch) - len(kept)
                    stats.items -= len(batch) - len(kept)
                    batch = kept
                if batch:
                    replies = backend.generate(batch, seeds)
                    budget.add([g for gens in replies for g in gens])
                    for seed, gens in zip(seeds, replies, strict=True):
                        for row, gen in zip(batch, gens, strict=True):
                            p = score_generation(row, gen, benchmark=name, seed=seed, version=version)
                            metrics.add(p)
                            writer.add(name, p)
                bar.update(len(batch))
            writer.flush(name)

        if specs:
            store = ImageStore(str(cache_dir / "benchmark-images"))
            for spec in specs:
                stats = loads[spec.name] = LoadStats()
                bar.set_postfix_str(spec.name)
                run_rows(spec.name, iter_benchmark(spec, data_dir, store, stats, config.limit), stats)
                log.info("%s: %d item(s) evaluated, skipped %s", spec.name, stats.items, dict(stats.skipped))
        else:
            # A dataset's sources play the part of benchmarks (items are grouped by source).
            def stats_of(source: str) -> LoadStats:
                return loads.setdefault(source, LoadStats(files=[config.questions_uri or ""]))

            def skip(source: str, reason: str) -> None:
                stats_of(source).skipped[reason] += 1
                bar.update(1)

            def counted(rows: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
                for row in rows:
                    stats_of(row["source"]).items += 1
                    yield row

            # Consecutive rows of one source form a group (a source may come back in several groups).
            rows = counted(iter_questions(files, config, on_skip=skip))
            for source, group in itertools.groupby(rows, key=_source):
                run_rows(source, group, loads[source])
        bar.close()
        budget.check()  # the whole run, however small

        per_benchmark: dict[str, dict[str, Any]] = {}
        for name, stats in loads.items():
            spec = BENCHMARKS.get(name) if specs else None
            per_benchmark[name] = {
                "title": spec.title if spec else name,
                **stats.to_dict(),
                **metrics.benchmark_summary(name),
                "paper_octomed_7b": spec.paper_octomed_7b if spec else None,
            }
        report: dict[str, Any] = {
            "model": config.model,
            "backend": backend.describe(),
            "protocol": {
                "prompting": config.prompting,
                "temperature": config.temperature,
                "top_p": config.top_p,
                "seeds": seeds,
                "max_new_tokens": config.max_new_tokens,
                "force_end_of_thinking": config.force_end_of_thinking,
                "force_answer_tokens": config.force_answer_tokens,
                "prefill_think": protocol_in_effect.prefill_think,
                "limit_per_benchmark": config.limit,
                "max_request_error_rate": config.max_request_error_rate,
                "std": "sample standard deviation over seeds (ddof 1)",
            },
            # What the backend actually sent / set (top-k off, no repetition penalty, eos list ...).
            "sampling": backend.describe().get("sampling"),
            "prompt_version": version,
            "inputs": {"benchmarks": [s.name for s in specs]}
            if specs
            else {"questions_uri": config.questions_uri},
            "items": sum(s.items for s in loads.values()),
            "predictions": writer.rows,
            "request_errors": budget.errors,
            "request_error_rate": round(budget.rate(), 6),
            "macro_accuracy": macro_accuracy(per_benchmark),
            "per_benchmark": per_benchmark,
            "per_task_type": metrics.task_summary(),
            "checkpoint_step": _checkpoint_step(config.model),
            "runtime_s": round(time.time() - started, 3),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        folder = EvaluationFolder(out_uri)
        metrics_uri, plot_uri, report_uri = folder.metrics, folder.reasoning_plot, folder.report
        storage.write_bytes(plot_uri, reasoning_length_png(report))
        storage.write_bytes(report_uri, report_markdown(report).encode("utf-8"))
        storage.write_json(metrics_uri, report)
    finally:
        if backend is not None:
            backend.close()
        if not config.work_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return EvalResult(
        output_uri=out_uri,
        metrics_uri=metrics_uri,
        predictions_uri=writer.dataset.uri,
        report_uri=report_uri,
        plot_uri=plot_uri,
        items=report["items"],
        predictions=report["predictions"],
        macro_accuracy=report["macro_accuracy"],
        per_benchmark=per_benchmark,
        per_task_type=report["per_task_type"],
        runtime_s=report["runtime_s"],
        request_errors=report["request_errors"],
    )


def _source(row: Mapping[str, Any]) -> str:
    return row["source"]


def _checkpoint_step(model: str) -> int | None:
    """The training step recorded in a checkpoint's checkpoint.json, when the model is one."""
    from training.checkpoints import CHECKPOINT_MARKER

    if model.startswith(("http://", "https://")):
        return None
    marker = storage.join(model, CHECKPOINT_MARKER)
    try:
        return storage.read_json(marker).get("step") if storage.exists(marker) else None
    except (OctomedError, ValueError):
        return None
