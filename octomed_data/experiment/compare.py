"""The comparison report of an experiment: every number recomputed from the arms' predictions.

Per arm and benchmark: accuracy under each protocol seed, then mean ± sample std over seeds; the
difference Δ to the reference arm with a 95% confidence interval from a **paired bootstrap over
items and seeds** (:func:`paired_bootstrap`: both arms answered the same items under the same
protocol seeds, so items and seeds are resampled together, ``BOOTSTRAP_RESAMPLES`` times with a
fixed seed: deterministic). An effect is *beyond noise* only when its interval excludes 0: one
flipped item of four is not, however small the seed variance. Per task group (text / multimodal /
classification, by whether the item has an image: the paper's Fig. 1) the mean over the group's
benchmarks, with its Δ and interval. Also: the traces and tokens each arm trained on, which arms
shared a checkpoint, mean reasoning tokens per benchmark and task type (the paper's
length-calibration view), and the paper's reported direction of each effect beside the measured one.
The result is drawn (markdown, plots) by :mod:`octomed_data.experiment.report`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from octomed_data import storage
from octomed_data.experiment.spec import TASK_GROUPS, task_group

MACRO = "macro"
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20250101  # fixed: the same predictions always give the same intervals
CONFIDENCE = 0.95
LENGTH = "length:"  # an expectation on reasoning length within an arm: length:A/B
_COLUMNS = ["benchmark", "task_type", "seed", "correct", "reasoning_tokens"]


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def arm_metrics(predictions_uri: str) -> dict[str, Any]:
    """Accuracy per benchmark per seed (and their mean/std), reasoning tokens per benchmark and task.

    Streamed shard by shard from the evaluation's ``predictions`` dataset.
    """
    ds = storage.Dataset(predictions_uri)
    hits: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    tokens: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    task_tokens: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for shard in ds.committed_names():
        t = ds.read_shard(shard, _COLUMNS)
        for bench, task, seed, ok, rt in zip(*(t.column(c).to_pylist() for c in _COLUMNS), strict=True):
            cell = hits[bench][int(seed or 0)]
            cell[0] += bool(ok)
            cell[1] += 1
            for acc in (tokens[bench], task_tokens[task]):
                acc[0] += int(rt or 0)
                acc[1] += 1
    benchmarks: dict[str, Any] = {}
    seeds_all: set[int] = set()
    for bench in sorted(hits):
        per_seed = {s: c / n for s, (c, n) in sorted(hits[bench].items()) if n}
        seeds_all |= set(per_seed)
        mean, std = _mean_std(list(per_seed.values()))
        items = max(n for _, n in hits[bench].values())
        benchmarks[bench] = {"per_seed": per_seed, "mean": mean, "std": std, "items": items}
    macro_seeds = {
        s: sum(b["per_seed"][s] for b in benchmarks.values()) / len(benchmarks)
        for s in sorted(seeds_all)
        if all(s in b["per_seed"] for b in benchmarks.values())
    }
    mean, std = _mean_std(list(macro_seeds.values()))
    benchmarks[MACRO] = {"per_seed": macro_seeds, "mean": mean, "std": std, "items": None}
    return {
        "accuracy": benchmarks,
        "reasoning_tokens": {b: round(s / n, 1) for b, (s, n) in sorted(tokens.items()) if n},
        "reasoning_tokens_by_task": {t: round(s / n, 1) for t, (s, n) in sorted(task_tokens.items()) if n},
    }


# ----------------------------------------------------------------------------- item outcomes


def question_images(questions_uri: str) -> dict[str, bool]:
    """question id -> has an image, of an evaluation question dataset (never reads the images)."""
    import pyarrow.compute as pc

    ds = storage.Dataset(questions_uri)
    out: dict[str, bool] = {}
    for shard in ds.committed_names():
        t = ds.read_shard(shard, ["question_id", "images"])
        counts = pc.fill_null(pc.list_value_length(t.column("images")), 0).to_pylist()
        out.update(zip(t.column("question_id").to_pylist(), [n > 0 for n in counts], strict=True))
    return out


def item_images(evaluation: Mapping[str, Any]) -> dict[str, bool] | None:
    """question id -> has an image, of the items an arm was evaluated on: from its question dataset
    (``questions_uri``), or the map the flow wrote for registry benchmarks (``item_images``, a JSON
    object); None when neither is recorded (groups then fall back to the task type)."""
    if evaluation.get("questions_uri"):
        return question_images(evaluation["questions_uri"])
    if evaluation.get("item_images"):
        return {str(k): bool(v) for k, v in storage.read_json(evaluation["item_images"]).items()}
    return None


def item_outcomes(predictions_uri: str) -> dict[str, dict[str, Any]]:
    """Per benchmark: ``items`` (question ids), ``seeds``, ``correct`` (items x seeds, NaN where an
    item has no prediction under a seed) and ``task_type`` per item, from the predictions files."""
    ds = storage.Dataset(predictions_uri)
    cells: dict[str, dict[tuple[str, int], bool]] = defaultdict(dict)
    tasks: dict[str, dict[str, str]] = defaultdict(dict)
    columns = ["benchmark", "question_id", "task_type", "seed", "correct"]
    for shard in ds.committed_names():
        t = ds.read_shard(shard, columns)
        for bench, qid, task, seed, ok in zip(*(t.column(c).to_pylist() for c in columns), strict=True):
            cells[bench][(qid, int(seed or 0))] = bool(ok)
            tasks[bench][qid] = task
    out: dict[str, dict[str, Any]] = {}
    for bench in sorted(cells):
        items = sorted(tasks[bench])
        seeds = sorted({s for _, s in cells[bench]})
        m = np.full((len(items), len(seeds)), np.nan)
        row, col = {q: i for i, q in enumerate(items)}, {s: j for j, s in enumerate(seeds)}
        for (qid, seed), ok in cells[bench].items():
            m[row[qid], col[seed]] = float(ok)
        out[bench] = {
            "items": items,
            "seeds": seeds,
            "correct": m,
            "task_type": [tasks[bench][q] for q in items],
        }
    return out


def _paired(a: Mapping[str, Any], r: Mapping[str, Any], keep: set[str] | None = None) -> np.ndarray:
    """Arm minus reference, per (item, seed) both answered (items in ``keep`` only, when given)."""
    items = sorted(set(a["items"]) & set(r["items"]) & (keep if keep is not None else set(a["items"])))
    seeds = sorted(set(a["seeds"]) & set(r["seeds"]))
    if not items or not seeds:
        return np.zeros((0, 0))

    def pick(o: Mapping[str, Any]) -> np.ndarray:
        ri = {q: i for i, q in enumerate(o["items"])}
        ci = {s: j for j, s in enumerate(o["seeds"])}
        return o["correct"][np.ix_([ri[q] for q in items], [ci[s] for s in seeds])]

    return pick(a) - pick(r)


def paired_bootstrap(
    diffs: Sequence[np.ndarray], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> dict[str, Any]:
    """Δ (the mean over benchmarks of each benchmark's mean paired difference) and its percentile
    interval: each resample draws every benchmark's items with replacement and the protocol seeds
    with replacement (the same seed draw for all benchmarks of that resample), then recomputes Δ.

    ``diffs``: one items x seeds matrix of (arm - reference) per benchmark, NaN where either arm
    lacks that prediction. Deterministic for a given ``seed``. With one item and one seed the
    interval is that one difference (no spread can be estimated).
    """
    mats = [d for d in diffs if d.size and not np.isnan(d).all()]
    if not mats:
        return {"delta": None, "ci_low": None, "ci_high": None, "beyond_noise": None, "resamples": 0}

    def mean_of(d: np.ndarray) -> float:
        return float(np.nanmean(d))

    delta = float(np.mean([mean_of(d) for d in mats]))
    rng = np.random.default_rng(seed)
    n_seeds = mats[0].shape[1]
    same_seeds = all(d.shape[1] == n_seeds for d in mats)
    seed_w = rng.multinomial(n_seeds, [1 / n_seeds] * n_seeds, size=resamples) if same_seeds else None
    per_bench = []
    for d in mats:
        n, s = d.shape
        item_w = rng.multinomial(n, [1 / n] * n, size=resamples)  # (B, n) draw counts
        w = seed_w if seed_w is not None else rng.multinomial(s, [1 / s] * s, size=resamples)
        known = (~np.isnan(d)).astype(float)
        num = np.einsum("bi,is,bs->b", item_w, np.nan_to_num(d), w)
        den = np.einsum("bi,is,bs->b", item_w, known, w)
        per_bench.append(np.divide(num, den, out=np.zeros_like(num), where=den > 0))
    boots = np.mean(per_bench, axis=0)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = (float(x) for x in np.percentile(boots, [tail, 100 - tail]))
    return {
        "delta": delta,
        "ci_low": low,
        "ci_high": high,
        "beyond_noise": bool(low > 0 or high < 0),
        "resamples": resamples,
    }


def _group_means(
    outcomes: Mapping[str, Mapping[str, Any]], groups: Mapping[str, bool] | None
) -> dict[str, Any]:
    """Per task group: the mean over benchmarks of the accuracy on the group's items (and per seed)."""
    out: dict[str, Any] = {}
    for group in TASK_GROUPS:
        accs, per_seed = [], defaultdict(list)
        for o in outcomes.values():
            rows = [i for i, q in enumerate(o["items"]) if _group_of(q, o["task_type"][i], groups) == group]
            if not rows:
                continue
            m = o["correct"][rows]
            accs.append(float(np.nanmean(m)))
            for j, s in enumerate(o["seeds"]):
                if not np.isnan(m[:, j]).all():
                    per_seed[s].append(float(np.nanmean(m[:, j])))
        if accs:
            out[group] = {
                "mean": float(np.mean(accs)),
                "benchmarks": len(accs),
                "per_seed": {s: float(np.mean(v)) for s, v in sorted(per_seed.items())},
            }
    return out


def _group_of(qid: str, task_type: str, images: Mapping[str, bool] | None) -> str:
    if images is not None and qid in images:
        return task_group(task_type, images[qid])
    from octomed_data.schema import TaskType

    # No record of the item's images: the task type's usual modality (the report says so).
    return task_group(task_type, TaskType(task_type).is_multimodal)


def _group_keep(o: Mapping[str, Any], group: str, groups: Mapping[str, bool] | None) -> set[str]:
    return {q for q, t in zip(o["items"], o["task_type"], strict=True) if _group_of(q, t, groups) == group}


def measured_direction(diff: Mapping[str, Any]) -> str:
    """up / down when Δ's interval excludes 0, else same."""
    delta = diff.get("delta")
    if delta is None:
        return "n/a"
    if not diff.get("beyond_noise"):
        return "same"
    return "up" if delta > 0 else "down"


def load_outcomes(records: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per finished arm: its item outcomes (from its predictions) and whether each item has an
    image (:func:`item_images`; None: groups by task type)."""
    outcomes: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    for name, rec in records.items():
        uri = rec.get("evaluation", {}).get("predictions_uri")
        if rec.get("status") != "COMPLETED" or not uri:
            continue
        outcomes[name] = item_outcomes(uri)
        groups[name] = item_images(rec.get("evaluation", {}))
    return outcomes, groups


def compare(
    spec: Any,
    records: Mapping[str, Mapping[str, Any]],
    outcomes: Mapping[str, Any] | None = None,
    groups: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole comparison (JSON-able) from each arm's record (``metrics``, ``data``, ``train``,
    ``evaluation``) and its predictions (``outcomes``/``groups``: :func:`load_outcomes`'s, read
    from the records when not given)."""
    if outcomes is None:
        outcomes, groups = load_outcomes(records)
    groups = groups or {}
    ref_name = spec.reference
    ref_out = outcomes.get(ref_name, {})
    benches = sorted(
        {b for r in records.values() for b in r.get("metrics", {}).get("accuracy", {})} - {MACRO}
    )
    rows = []
    group_rows = []
    tests: dict[tuple[str, str], dict[str, Any]] = {}
    for arm in spec.arms:
        rec = records.get(arm.name, {})
        acc = rec.get("metrics", {}).get("accuracy", {})
        out = outcomes.get(arm.name, {})
        common = [b for b in benches if b in out and b in ref_out]
        for bench in [*benches, MACRO]:
            cell = acc.get(bench, {})
            row = {"arm": arm.name, "benchmark": bench, "mean": cell.get("mean"), "std": cell.get("std")}
            row["seeds"] = len(cell.get("per_seed") or {})
            row["items"] = cell.get("items")
            if arm.name == ref_name:
                row |= {"delta": 0.0, "ci_low": None, "ci_high": None, "beyond_noise": None}
            elif cell.get("mean") is None:
                row |= {"delta": None, "ci_low": None, "ci_high": None, "beyond_noise": None}
            else:
                picked = common if bench == MACRO else [bench] if bench in common else []
                test = paired_bootstrap([_paired(out[b], ref_out[b]) for b in picked])
                row |= {k: test[k] for k in ("delta", "ci_low", "ci_high", "beyond_noise")}
            tests[(arm.name, bench)] = row
            rows.append(row)
        means = _group_means(out, groups.get(arm.name)) if out else {}
        for group in TASK_GROUPS:
            if group not in means:
                continue
            g = {"arm": arm.name, "group": group} | {
                k: means[group][k] for k in ("mean", "benchmarks", "per_seed")
            }
            if arm.name == ref_name:
                g |= {"delta": 0.0, "ci_low": None, "ci_high": None, "beyond_noise": None}
            else:
                diffs = [
                    _paired(out[b], ref_out[b], keep=_group_keep(out[b], group, groups.get(arm.name)))
                    for b in common
                ]
                test = paired_bootstrap(diffs)
                g |= {k: test[k] for k in ("delta", "ci_low", "ci_high", "beyond_noise")}
            tests[(arm.name, f"group:{group}")] = g
            group_rows.append(g)
    expectations = []
    for e in spec.expect:
        metrics = records.get(e.arm, {}).get("metrics", {})
        if e.metric.startswith(LENGTH):  # length:A/B, within the arm: reasoning tokens on A vs on B
            a, _, b = e.metric.removeprefix(LENGTH).partition("/")
            tokens = metrics.get("reasoning_tokens", {})
            ratio = tokens[a] / tokens[b] if tokens.get(a) is not None and tokens.get(b) else None
            measured = (
                "n/a" if ratio is None else "up" if ratio > 1.1 else "down" if ratio < 1 / 1.1 else "same"
            )
            shown = "–" if ratio is None else f"×{ratio:.2f}"
            value = ratio
        else:
            diff = tests.get((e.arm, e.metric), {})
            measured, value = measured_direction(diff), diff.get("delta")
            shown = signed(value) + (ci_text(diff) if diff.get("ci_low") is not None else "")
        agrees = None if measured == "n/a" else measured == e.direction
        expectations.append(
            e.model_dump() | {"value": value, "shown": shown, "measured": measured, "agrees": agrees}
        )
    data = {}
    for a in spec.arms:
        rec = records.get(a.name, {})
        data[a.name] = {
            "status": rec.get("status"),
            "fingerprint": rec.get("data", {}).get("fingerprint"),
            # What of each trace it trained on: reasoning, or answer_only (direct answers).
            "content": rec.get("data", {}).get("content", "reasoning") if rec.get("data") else None,
            "traces": rec.get("data", {}).get("traces"),
            "questions": rec.get("data", {}).get("questions"),
            "trace_tokens": rec.get("data", {}).get("completion_tokens"),
            "train_rows": rec.get("mixture", {}).get("train_rows"),
            "steps": rec.get("train", {}).get("steps"),
            "examples_trained": rec.get("train", {}).get("samples_seen"),
            "final_loss": rec.get("train", {}).get("final_loss"),
            "trained_by": rec.get("trained_by") or (a.name if rec.get("train") else None),
        }
        if rec.get("rl") and data[a.name]["trained_by"]:  # its SFT checkpoint, then its own GRPO run
            data[a.name]["trained_by"] += " + RL"
    same: dict[str, list[str]] = defaultdict(list)
    shared: dict[str, list[str]] = defaultdict(list)
    for name, d in data.items():
        if d["fingerprint"]:
            same[d["fingerprint"]].append(name)
        if d["trained_by"]:
            shared[d["trained_by"]].append(name)
    lengths = {
        a.name: records.get(a.name, {}).get("metrics", {}).get("reasoning_tokens", {}) for a in spec.arms
    }
    basis = {name: "image" if groups.get(name) is not None else "task_type" for name in outcomes}
    curves = {a.name: learning_curve(records.get(a.name, {})) for a in spec.arms}
    teachers = []
    for a in spec.arms:  # arms on a teacher's own distillation: what it cost, gave and taught
        rec = records.get(a.name, {})
        if rec.get("teacher"):
            macro = rec.get("metrics", {}).get("accuracy", {}).get(MACRO, {})
            diff = tests.get((a.name, MACRO), {})
            teachers.append(
                {"arm": a.name}
                | rec["teacher"]
                | {"accuracy": macro.get("mean"), "accuracy_std": macro.get("std")}
                | {k: diff.get(k) for k in ("delta", "ci_low", "ci_high", "beyond_noise")}
            )
    return {
        "experiment": spec.name,
        "reference": spec.reference,
        "control": spec.control,
        "benchmarks": benches,
        "statistics": {
            "test": "paired bootstrap over items and protocol seeds",
            "resamples": BOOTSTRAP_RESAMPLES,
            "seed": BOOTSTRAP_SEED,
            "confidence": CONFIDENCE,
            "beyond_noise": "the interval of Δ excludes 0",
            "groups_by": basis,  # image: the evaluated items' images; task_type: no record of them
        },
        "accuracy": rows,
        "groups": group_rows,
        "data": data,
        "same_data": [names for names in same.values() if len(names) > 1],
        "shared_checkpoints": [names for names in shared.values() if len(names) > 1],
        "reasoning_tokens": lengths,
        "reasoning_tokens_by_task": {
            a.name: records.get(a.name, {}).get("metrics", {}).get("reasoning_tokens_by_task", {})
            for a in spec.arms
        },
        "expectations": expectations,
        # Per arm (with evaluation.every_steps): accuracy at each evaluated checkpoint.
        "learning_curves": {name: points for name, points in curves.items() if points},
        # Per arm on a teacher's distillation: pass rate, reasoning length, cost, downstream accuracy.
        "teachers": teachers,
    }


def learning_curve(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The arm's learning curve from its record's ``curve`` (one point per evaluated checkpoint):
    step, examples trained on up to it, and accuracy recomputed from that checkpoint's predictions
    (macro: the mean over benchmarks of the mean over seeds; per benchmark; per seed)."""
    points = []
    for p in record.get("curve") or []:
        acc = arm_metrics(p["predictions_uri"])["accuracy"]
        points.append(
            {
                "step": p["step"],
                "examples": p.get("examples"),
                "accuracy": acc[MACRO]["mean"],
                "per_seed": acc[MACRO]["per_seed"],
                "per_benchmark": {b: v["mean"] for b, v in acc.items() if b != MACRO},
                "predictions_uri": p["predictions_uri"],
            }
        )
    return points


def signed(x: float | None) -> str:
    """A difference in signed percent points ('–' when there is none)."""
    return "–" if x is None else f"{100 * x:+.1f}"


def ci_text(r: Mapping[str, Any]) -> str:
    """A difference's confidence interval in percent points."""
    if r.get("ci_low") is None:
        return "–"
    return f"[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]"
