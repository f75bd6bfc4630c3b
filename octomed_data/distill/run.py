"""``--estimate``: a run's cost and duration projected from a small real sample, before spending."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from pydantic import SecretStr

from octomed_data import storage
from octomed_data.distill.engine import adistill_shard
from octomed_data.distill.journal import raw_uri
from octomed_data.errors import StorageError
from octomed_data.layout import DistillFolder, EstimateFolder
from octomed_data.schema import QUESTION_SCHEMA, SAMPLE_SCHEMA
from octomed_data.teachers import DistillConfig


def _teacher_counts(questions_uri: str, config: DistillConfig) -> dict[str, int]:
    import pyarrow.compute as pc

    counts: Counter[str] = Counter()
    ds = storage.Dataset(questions_uri, QUESTION_SCHEMA)
    for batch in ds.iter_batches(batch_size=65536, columns=["task_type", "images"]):
        images = pc.fill_null(pc.list_value_length(batch.column(1)), 0).to_pylist()
        routes = zip(batch.column(0).to_pylist(), [n > 0 for n in images], strict=True)
        for (task_type, image), n in Counter(routes).items():  # routed by image presence
            counts[config.teacher_for(task_type, image).name] += n
    return dict(counts)


def estimate(
    questions_uri: str,
    config: DistillConfig,
    sample_questions: int = 20,
    *,
    samples_per_question: int = 2,
    out: str | None = None,
    api_keys: Mapping[str, str | SecretStr] | None = None,
) -> dict[str, Any]:
    """Project the full run's tokens, cost and duration from a small real sample.

    Sends ``sample_questions x samples_per_question`` requests (the first questions of the
    dataset, stored under ``OUT/_estimate`` or a temporary folder), measures tokens and latency
    per teacher, and scales by the number of questions each teacher will get and the config's
    N, prices, in-flight bound and rate limits.
    """
    counts = _teacher_counts(questions_uri, config)
    if not counts:
        raise StorageError(f"no questions in {questions_uri}")
    picked: list[dict[str, Any]] = []
    for row in storage.Dataset(questions_uri, QUESTION_SCHEMA).iter_rows(batch_size=256):
        picked.append(row)
        if len(picked) >= sample_questions:
            break
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="octomed-estimate-")
        work = tmp.name
    else:
        work = DistillFolder(out).estimate
    try:
        qdir = EstimateFolder(work).questions
        storage.Dataset(qdir, QUESTION_SCHEMA).write_shard("sample", picked)
        # The probe is sent online even for batch-mode teachers: a batch may take its whole window.
        online = [t.model_copy(update={"mode": "online"}) for t in config.teachers]
        probe = config.model_copy(update={"samples": samples_per_question, "teachers": online})
        started = time.monotonic()
        report = asyncio.run(
            adistill_shard(qdir, "sample", EstimateFolder(work).out, probe, api_keys=api_keys)
        )
        wall = time.monotonic() - started
        per_teacher = _measure(raw_uri(EstimateFolder(work).out), qdir)
    finally:
        if tmp is not None:
            tmp.cleanup()
    projection: dict[str, Any] = {}
    total_usd = 0.0
    durations = []
    for name, n_questions in sorted(counts.items()):
        t = config.teacher(name)
        m = per_teacher.get(name)
        if not m:
            projection[name] = {"questions": n_questions, "error": "no successful sample to measure"}
            continue
        samples = n_questions * config.samples
        requests = samples if not t.supports_n else n_questions
        prompt_tokens = int(m["prompt_tokens_per_request"] * requests)
        completion_tokens = int(m["completion_tokens_per_sample"] * samples)
        usd = t.cost_usd(prompt_tokens, completion_tokens, batch=t.mode == "batch")
        # The slowest of: concurrency x latency, the request budget, the token budget.
        bounds = {"in_flight": requests * m["latency_s_median"] / t.max_in_flight}
        if t.rpm:
            bounds["rpm"] = requests / t.rpm * t.rate_window_s
        if t.tpm:
            bounds["tpm"] = (prompt_tokens + completion_tokens) / t.tpm * t.rate_window_s
        seconds = max(bounds.values())
        durations.append(seconds)
        total_usd += usd
        projection[name] = {
            "questions": n_questions,
            "samples": samples,
            "requests": requests,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "cost_usd": round(usd, 2),
            "mode": t.mode,  # batch: at the batch price; its duration is the provider's (up to the window)
            "duration_s": round(seconds, 1),
            "bound_by": max(bounds, key=lambda k: bounds[k]),
            "measured": m,
        }
    return {
        "sampled_questions": len(picked),
        "samples_per_question": samples_per_question,
        "probe_requests": report.requests,
        "probe_failed": report.failed,
        "probe_seconds": round(wall, 2),
        "teachers": projection,
        "total_cost_usd": round(total_usd, 2),
        "total_duration_s": round(max(durations), 1) if durations else None,
        "assumes": "teachers run concurrently; pass rate and lengths as in the sample",
    }


def _measure(raw: str, questions_uri: str) -> dict[str, dict[str, float]]:
    from octomed_data.rejection import judge, question_options

    by: dict[str, dict[str, list[float]]] = {}
    cols = ["teacher", "prompt_tokens", "completion_tokens", "latency_s", "correct", "reject_reason"]
    ds = storage.Dataset(raw, SAMPLE_SCHEMA)
    options: dict[str, list[tuple[str, str]]] = {}
    for shard in ds.committed_names():
        options.update(question_options(questions_uri, shard))
    for row in ds.iter_rows():
        if row["reject_reason"] == "request_failed":
            continue
        row.update(judge(row, options.get(row["question_id"], [])))
        d = by.setdefault(row["teacher"], {c: [] for c in cols[1:5]})
        for c in cols[1:5]:
            d[c].append(float(row[c] or 0))
    out = {}
    for name, d in by.items():
        n = len(d["latency_s"])
        prompts = [p for p in d["prompt_tokens"] if p > 0]
        out[name] = {
            "samples": n,
            "prompt_tokens_per_request": statistics.fmean(prompts) if prompts else 0.0,
            "completion_tokens_per_sample": statistics.fmean(d["completion_tokens"]),
            "latency_s_median": statistics.median(d["latency_s"]),
            "pass_rate": sum(d["correct"]) / n,
        }
    return out
