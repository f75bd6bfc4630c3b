"""An arm's training data: the base run's accepted traces, selected without a teacher request.

Streamed shard by shard (the base run's ``filter/accepted``; pass rates from ``filter/verdicts``
of the same shard), written as the arm's own accepted dataset. The arm's **data fingerprint** hashes
exactly which traces were kept (question, sample index, teacher, model, prompt version, sampling
params) and what of each trace the arm trains on (``export``: reasoning, or the answer line alone),
so two arms with the same data have the same fingerprint whatever their selections said.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.experiment.spec import SOURCE_GROUPS, Arm, band_contains, task_group
from octomed_data.layout import RunPaths
from octomed_data.rejection import FAILED
from octomed_data.schema import ACCEPTED_SCHEMA

KEY_FIELDS = ("question_id", "sample_idx", "teacher", "model", "prompt_version", "params_hash")


@dataclass
class ArmData:
    """What an arm trains on (before the mixture's split): counts, tokens, the fingerprint."""

    uri: str
    fingerprint: str
    content: str = "reasoning"  # what of each trace is trained on: reasoning | answer_only
    traces: int = 0
    questions: int = 0
    completion_tokens: int = 0  # teacher reply tokens of the kept traces (reasoning + answer)
    per_source: dict[str, int] = field(default_factory=dict)
    per_group: dict[str, int] = field(default_factory=dict)  # traces per task group (by image presence)
    mean_tokens_by_task: dict[str, float] = field(default_factory=dict)  # trace length per task type

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def base_sources(base: RunPaths) -> set[str]:
    """Every source with accepted traces in the base run (one column read)."""
    ds = storage.Dataset(base.accepted)
    return {
        s for shard in ds.committed_names() for s in ds.read_shard(shard, ["source"]).column(0).to_pylist()
    }


def question_images(questions: storage.Dataset, shard: str) -> dict[str, bool]:
    """Per question of one shard: does it have an image (two small columns, never the images)."""
    import pyarrow.compute as pc

    if questions.shard_info(shard) is None:
        return {}
    table = questions.read_shard(shard, ["question_id", "images"])
    counts = pc.fill_null(pc.list_value_length(table.column("images")), 0).to_pylist()
    return dict(zip(table.column("question_id").to_pylist(), [n > 0 for n in counts], strict=True))


def source_matcher(arm: Arm, known: set[str]):
    """``(row, group) -> bool`` for the arm's sources (names, or groups: ``group`` is the row's
    :func:`~octomed_data.experiment.spec.task_group`); unknown names are one error line."""
    if arm.sources is None:
        return lambda row, group: True
    names = {s for s in arm.sources if s not in SOURCE_GROUPS}
    unknown = sorted(names - known)
    if unknown:
        raise ConfigError(
            f"arm {arm.name!r}: source(s) {unknown} have no accepted traces in the base run "
            f"(sources: {sorted(known)}; groups: {sorted(SOURCE_GROUPS)})"
        )
    groups = {s for s in arm.sources if s in SOURCE_GROUPS}
    if "all" in groups:
        return lambda row, group: True
    return lambda row, group: row["source"] in names or group in groups


def pass_rates(verdicts: storage.Dataset, shard: str) -> dict[str, float]:
    """Per question of one shard: accepted / judged samples (failed requests are not samples)."""
    judged: Counter[str] = Counter()
    correct: Counter[str] = Counter()
    if verdicts.shard_info(shard) is None:
        return {}
    table = verdicts.read_shard(shard, ["question_id", "correct", "reject_reason"])
    for qid, ok, reason in zip(*(table.column(i).to_pylist() for i in range(3)), strict=True):
        if reason == FAILED:
            continue
        judged[qid] += 1
        correct[qid] += bool(ok)
    return {q: correct[q] / n for q, n in judged.items()}


def _first_k(
    rows: Iterable[dict[str, Any]], k: int | None, mode: str = "first_k_drawn"
) -> list[dict[str, Any]]:
    """Per question, its traces ordered by sample index: with ``first_k_drawn`` the accepted ones
    among the first ``k`` samples drawn (sample index < k: the paper's k samples per question),
    with ``first_k_accepted`` the first ``k`` accepted ones. Either way k=1 ⊂ k=4 ⊂ k=16."""
    by_question: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_question[row["question_id"]].append(row)
    out: list[dict[str, Any]] = []
    for qid in sorted(by_question):
        group = sorted(by_question[qid], key=lambda r: int(r["sample_idx"]))
        if k is not None:
            group = [r for r in group if int(r["sample_idx"]) < k] if mode == "first_k_drawn" else group[:k]
        out.extend(group)
    return out


def select_arm(base: RunPaths, arm: Arm, out: str) -> ArmData:
    """Write the arm's selection of the base run's accepted traces to ``out``; return its data record."""
    accepted = storage.Dataset(base.accepted)
    shards = accepted.committed_names()
    if not shards:
        raise ConfigError(
            f"the base run {base.run_id!r} has no accepted traces at {base.accepted}: "
            "run its distill and filter stages first"
        )
    keep_source = source_matcher(arm, base_sources(base))
    teachers = set(arm.teachers) if arm.teachers is not None else None
    verdicts = storage.Dataset(base.verdicts)
    questions = storage.Dataset(base.questions)
    dst = storage.Dataset(out, ACCEPTED_SCHEMA)  # the verifier's provenance goes with each trace
    dst.drop_stale(shards)
    digest = hashlib.sha256()
    if arm.export != "reasoning":  # the same traces, other training data (reasoning keeps old fingerprints)
        digest.update(f"content:{arm.export}\n".encode())
    if arm.teacher_run is not None:  # another teacher's distillation: sandbox keys alone may coincide
        digest.update(f"base:{base.run_id}\n".encode())
    data = ArmData(uri=out, fingerprint="", content=arm.export)
    per_source: Counter[str] = Counter()
    per_group: Counter[str] = Counter()
    task_tokens: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for shard in shards:
        rates = pass_rates(verdicts, shard) if arm.pass_rate is not None else {}
        images = question_images(questions, shard)
        rows, groups = [], {}
        for row in accepted.read_shard(shard).to_pylist():
            qid = row["question_id"]
            if qid not in images:
                raise ConfigError(
                    f"the base run {base.run_id!r}: accepted question {qid} of shard {shard} is not in "
                    f"its questions ({base.questions}): re-run its distill and filter stages"
                )
            groups[qid] = task_group(row["task_type"], images[qid])
            if not keep_source(row, groups[qid]) or (teachers is not None and row["teacher"] not in teachers):
                continue
            if arm.pass_rate is not None:
                rate = rates.get(qid)
                if rate is None or not band_contains(arm.pass_rate, rate):
                    continue
            rows.append(row)
        rows = _first_k(rows, arm.samples_per_question, arm.k_mode)
        dst.write_shard(shard, pa.Table.from_pylist(rows, schema=ACCEPTED_SCHEMA))
        if rows:
            keys = sorted("|".join(str(r[f]) for f in KEY_FIELDS) for r in rows)
            digest.update(f"{len(keys)}\n".encode() + "\n".join(keys).encode() + b"\n")
        data.questions += len({r["question_id"] for r in rows})  # a question lives in one shard
        for r in rows:
            per_source[r["source"]] += 1
            per_group[groups[r["question_id"]]] += 1
            tokens = int(r.get("completion_tokens") or 0)
            data.completion_tokens += tokens
            task_tokens[r["task_type"]][0] += tokens
            task_tokens[r["task_type"]][1] += 1
        data.traces += len(rows)
    if not data.traces:
        raise ConfigError(f"arm {arm.name!r} selects no trace of the base run {base.run_id!r}")
    data.fingerprint = digest.hexdigest()[:16]
    data.per_source = dict(sorted(per_source.items()))
    data.per_group = dict(sorted(per_group.items()))
    data.mean_tokens_by_task = {t: round(s / n, 1) for t, (s, n) in sorted(task_tokens.items()) if n}
    return data


def teacher_summary(base: RunPaths) -> dict[str, Any]:
    """What a teacher's base distillation cost and gave (for the teacher comparison): its pass rate
    (accepted / judged samples), accepted traces, mean reasoning length of the accepted traces
    (characters) and of their replies (completion tokens), and the distillation's cost in USD
    (``simulated``: sandbox replies priced at the recipe's prices; then ``simulated_usd``)."""
    stats = storage.read_json(base.stats) if storage.exists(base.stats) else {}
    overall = stats.get("overall", {})
    cost = storage.read_json(base.cost) if storage.exists(base.cost) else {}
    tokens = [0, 0]
    ds = storage.Dataset(base.accepted)
    for shard in ds.committed_names():
        for t in ds.read_shard(shard, ["completion_tokens"]).column(0).to_pylist():
            tokens[0] += int(t or 0)
            tokens[1] += 1
    return {
        "run_id": base.run_id,
        "samples": overall.get("samples"),
        "accepted": overall.get("accepted"),
        "pass_rate": overall.get("pass_rate"),
        "reasoning_chars": (overall.get("reasoning_chars_accepted") or {}).get("mean"),
        "completion_tokens": round(tokens[0] / tokens[1], 1) if tokens[1] else None,
        "cost_usd": cost.get("total_usd"),
        "simulated": bool(cost.get("simulated")),
        "simulated_usd": cost.get("simulated_usd"),
    }
