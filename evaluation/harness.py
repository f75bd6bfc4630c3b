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

import hashlib
import itertools
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

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
from evaluation.outputs import EvalResult, PredictionWriter, score_generation
from evaluation.questions import iter_questions, scan_questions
from evaluation.report import MetricsAccumulator, macro_accuracy, reasoning_length_png, report_markdown
from octomed_data import storage
from octomed_data.errors import ConfigError, OctomedError
from octomed_data.images import ImageStore
from octomed_data.job_config import EvalConfig
from octomed_data.layout import CheckpointFolder, EvaluationFolder
from octomed_data.prompts import prompt_version
from training.data import DataFile, resolve_data_files

__all__ = [
    "EvalResult",
    "TooManyRequestErrors",
    "chat_messages",
    "evaluate",
    "reasoning_span",
    "score_generation",
]

log = logging.getLogger(__name__)

TEXT_ONLY_MODEL = "text_only_model"  # skip reason: an image question for a model without vision


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


# --------------------------------------------------------------------------- the run


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
    checkpoint = checkpoint_marker(config.model)
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
        writer = PredictionWriter(EvaluationFolder(out_uri).predictions, config.shard_size)
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
            "checkpoint_step": (checkpoint or {}).get("step"),
            # What made these numbers (the evaluation stage's done-signal): the settings and the
            # checkpoint's marker (None for a model folder or an endpoint: never "done").
            "config_hash": config.config_hash(),
            "checkpoint_hash": marker_hash(checkpoint),
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
    return EvalResult.from_report(out_uri, report)


def _source(row: Mapping[str, Any]) -> str:
    return row["source"]


def marker_hash(marker: dict[str, Any] | None) -> str | None:
    """A checkpoint's identity: the hash of its marker (None: no checkpoint marker)."""
    if marker is None:
        return None
    return hashlib.sha256(json.dumps(marker, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_marker(model: str) -> dict[str, Any] | None:
    """The ``checkpoint.json`` of a checkpoint model, None for a model folder without one or an endpoint."""
    if model.startswith(("http://", "https://")):
        return None
    marker = CheckpointFolder(model).marker
    try:
        return storage.read_json(marker) if storage.exists(marker) else None
    except (OctomedError, ValueError):
        return None
