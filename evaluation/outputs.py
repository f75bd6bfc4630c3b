"""What an evaluation writes: one scored PREDICTION_SCHEMA row per (item, seed), committed in
shards per benchmark, and the run's result (where everything went, its headline numbers)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from evaluation.backends import Generation, reasoning_span
from octomed_data import storage
from octomed_data.answers import extract_answer, is_correct, token_f1
from octomed_data.layout import EvaluationFolder
from octomed_data.schema import PREDICTION_SCHEMA, TaskType, options_of


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

    @classmethod
    def from_report(cls, output_uri: str, report: Mapping[str, Any]) -> EvalResult:
        """The result of the evaluation whose ``metrics.json`` is ``report``, written under ``output_uri``."""
        folder = EvaluationFolder(output_uri)
        return cls(
            output_uri=output_uri,
            metrics_uri=folder.metrics,
            predictions_uri=storage.Dataset(folder.predictions).uri,
            report_uri=folder.report,
            plot_uri=folder.reasoning_plot,
            items=report["items"],
            predictions=report["predictions"],
            macro_accuracy=report["macro_accuracy"],
            per_benchmark=report["per_benchmark"],
            per_task_type=report["per_task_type"],
            runtime_s=report["runtime_s"],
            request_errors=report["request_errors"],
        )


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


class PredictionWriter:
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
