"""The recipe lab end to end on CPU: ``octomed-data experiment sources`` (the paper's source ablation
on the lab recipe: bundled sample data, sandbox teacher, one tiny model) produces the comparison
report with every arm; arms select from the base run without a teacher request (1 ⊂ 4 ⊂ 16, source
groups, pass-rate bands, fingerprints), never hold a benchmark item, and a re-run reuses finished
arms while one arm can be re-run alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow.compute as pc
import pytest

from octomed_data import storage
from octomed_data.decontam import DecontamIndex
from octomed_data.errors import ConfigError
from octomed_data.experiment import load_spec
from octomed_data.experiment.arms import ExperimentPaths
from octomed_data.experiment.compare import paired_bootstrap
from octomed_data.experiment.select import select_arm
from octomed_data.experiment.spec import Arm
from octomed_data.layout import RunPaths
from octomed_data.release_card import registry_info

# The module's first test sets up ``lab`` (the whole ablation through the CLI: 474 s in a green CI
# run at load 5-23, within reach of pytest-timeout's default 600 s on a slower day).
pytestmark = pytest.mark.timeout(1200)


def _cli(*args: str, home: Path, api: str | None = None) -> subprocess.CompletedProcess:
    """The CLI as a process: with its own local Prefect, as a user would (the module's first run),
    or against ``api``, the session's Prefect server (one API start instead of one per run)."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PREFECT_HOME=str(home))
    env.pop("PREFECT_API_URL", None)
    if api is not None:
        env["PREFECT_API_URL"] = api
    return subprocess.run(
        [sys.executable, "-m", "cli", "experiment", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.fixture(scope="module")
def prefect_api(prefect_harness) -> str:
    """The session's Prefect API URL, for CLI processes after the first."""
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The ready-made source-ablation spec, run once through the CLI."""
    tmp = tmp_path_factory.mktemp("lab")
    store = str(tmp / "store")
    proc = _cli("sources", "--store", store, home=tmp / "prefect")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return tmp, store, proc


def _accuracy_from_predictions(uri: str) -> dict[str, dict[int, float]]:
    table = storage.Dataset(uri).read_all(["benchmark", "seed", "correct"]).to_pylist()
    hits: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r in table:
        hits[r["benchmark"]][r["seed"]][0] += r["correct"]
        hits[r["benchmark"]][r["seed"]][1] += 1
    return {b: {s: c / n for s, (c, n) in seeds.items()} for b, seeds in hits.items()}


def _question_images(uri: str) -> dict[str, bool]:
    rows = storage.Dataset(uri).read_all(["question_id", "images"]).to_pylist()
    return {r["question_id"]: bool(r["images"]) for r in rows}


def _groups_from_predictions(evaluation: dict) -> dict[str, float]:
    """Per group: the mean over benchmarks of the accuracy on the group's items (images from the file)."""
    if evaluation.get("questions_uri"):
        images = _question_images(evaluation["questions_uri"])
    else:  # registry benchmarks: the flow's map of the items' images (checked against the benchmarks below)
        images = json.loads(Path(evaluation["item_images"]).read_text())
    rows = (
        storage.Dataset(evaluation["predictions_uri"])
        .read_all(["benchmark", "question_id", "task_type", "correct"])
        .to_pylist()
    )
    hits: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r in rows:
        group = "classification" if r["task_type"] == "imaging_cls" else (
            "multimodal" if images[r["question_id"]] else "text"
        )  # fmt: skip
        hits[group][r["benchmark"]][0] += r["correct"]
        hits[group][r["benchmark"]][1] += 1
    return {g: sum(c / n for c, n in b.values()) / len(b) for g, b in hits.items()}


def _paired_matrix(evaluation: dict, reference: dict, bench: str):
    import numpy as np

    def cells(ev: dict) -> dict[tuple[str, int], bool]:
        rows = storage.Dataset(ev["predictions_uri"]).read_all(
            ["benchmark", "question_id", "seed", "correct"]
        )
        return {
            (r["question_id"], r["seed"]): r["correct"] for r in rows.to_pylist() if r["benchmark"] == bench
        }

    a, r = cells(evaluation), cells(reference)
    items = sorted({q for q, _ in a} & {q for q, _ in r})
    seeds = sorted({s for _, s in a} & {s for _, s in r})
    return np.array([[float(a[(q, s)]) - float(r[(q, s)]) for s in seeds] for q in items])


def test_the_source_ablation_runs_end_to_end_and_the_report_is_recomputable(lab) -> None:
    tmp, store, proc = lab
    spec = load_spec("sources")
    exp = ExperimentPaths(store, spec.name)
    comparison = json.loads(Path(exp.comparison).read_text())
    report = Path(exp.report).read_text()
    assert Path(exp.plot).read_bytes()[:4] == b"\x89PNG"
    assert f"report {exp.report}" in proc.stdout
    for arm in spec.arms:
        record = json.loads(Path(exp.record(arm.name)).read_text())
        assert record["status"] == "COMPLETED", record
        assert record["data"]["traces"] > 0 and record["train"]["steps"] == spec.training.max_steps
        assert f"| {arm.name} | COMPLETED |" in report
        # Training metrics went to TensorBoard event files (the local tracker).
        assert any("tfevents" in p.name for p in Path(record["tensorboard"]).rglob("*")), record[
            "tensorboard"
        ]
        # final_loss is the last step's loss, in arm.json and the checkpoint's checkpoint.json.
        train = record["train"]
        assert train["final_loss"] == train["losses"][-1] and len(train["losses"]) == 2  # steps 1 and 2
        marker = json.loads(Path(exp.arm(arm.name).checkpoints, "checkpoint.json").read_text())
        assert marker["step"] == train["steps"] and marker["loss"] == train["final_loss"]
        # Every accuracy in the report, recomputed here from the arm's predictions.
        per_seed = _accuracy_from_predictions(record["evaluation"]["predictions_uri"])
        assert per_seed, arm.name
        for bench, seeds in per_seed.items():
            (row,) = [r for r in comparison["accuracy"] if r["arm"] == arm.name and r["benchmark"] == bench]
            assert row["mean"] == pytest.approx(sum(seeds.values()) / len(seeds))
            assert row["seeds"] == len(seeds) == spec.evaluation.seeds
        # Per task group (by image presence of the evaluated questions) and Δ's bootstrap interval,
        # recomputed here from the predictions and the questions they answered.
        groups = _groups_from_predictions(record["evaluation"])
        for group, mean in groups.items():
            (g,) = [x for x in comparison["groups"] if x["arm"] == arm.name and x["group"] == group]
            assert g["mean"] == pytest.approx(mean)
        ref = json.loads(Path(exp.record(spec.reference)).read_text())
        for bench in per_seed:
            (row,) = [r for r in comparison["accuracy"] if r["arm"] == arm.name and r["benchmark"] == bench]
            if arm.name == spec.reference:
                assert row["delta"] == 0.0 and row["ci_low"] is None
                continue
            diff = _paired_matrix(record["evaluation"], ref["evaluation"], bench)
            expected = paired_bootstrap([diff])
            assert row["delta"] == pytest.approx(float(diff.mean()))
            assert (row["ci_low"], row["ci_high"], row["beyond_noise"]) == (
                expected["ci_low"], expected["ci_high"], expected["beyond_noise"]
            )  # fmt: skip
    assert comparison["statistics"]["groups_by"] == {a.name: "image" for a in spec.arms}
    # The lab evaluates MedQA (text), VQA-RAD (every item with its image, yes/no ones included) and
    # its held-out imaging classification (imaging_cls_lab: the classification group).
    evaluation = json.loads(Path(exp.record(spec.reference)).read_text())["evaluation"]
    images = json.loads(Path(evaluation["item_images"]).read_text())
    rows = storage.Dataset(evaluation["predictions_uri"]).read_all(["benchmark", "question_id", "task_type"])
    seen = {(r["benchmark"], images[r["question_id"]], r["task_type"]) for r in rows.to_pylist()}
    assert {(b, i) for b, i, _ in seen} == {("medqa", False), ("vqa_rad", True), ("imaging_cls_lab", True)}
    assert ("vqa_rad", True, "yes_no_maybe") in seen and ("imaging_cls_lab", True, "imaging_cls") in seen
    groups = {g["group"] for g in comparison["groups"]}
    assert groups == {"text", "multimodal", "classification"}
    # The groups partition the questions: all = text + multimodal + classification, trace for trace,
    # the text arm holds no question with an image, the multimodal arm no question without one (the
    # lab's VQA-RAD train rows are decontaminated away: tests/distill/test_routing.py routes them).
    data = comparison["data"]
    assert data["all"]["traces"] == sum(data[g]["traces"] for g in ("text", "multimodal", "classification"))
    images = _question_images(RunPaths(store, spec.base_run).questions)
    for group in ("text", "multimodal"):
        rows = storage.Dataset(exp.arm(group).accepted).read_all(["question_id", "task_type"]).to_pylist()
        assert rows and all(images[r["question_id"]] == (group == "multimodal") for r in rows), group
        assert all(r["task_type"] != "imaging_cls" for r in rows)
    assert len({d["fingerprint"] for d in data.values()}) == 4
    assert "The paper's findings beside the measured effects" in report


def test_no_benchmark_item_is_ever_in_an_arm(lab) -> None:
    tmp, store, _ = lab
    table, _ = registry_info(None)
    index = DecontamIndex.from_registry(table)
    # The lab recipe's own held-out classification benchmark (its images).
    lab_images = set(
        table.filter(pc.equal(table["benchmark"], "imaging_cls_lab"))["image_sha256"].to_pylist()
    )
    assert len(lab_images) == 2
    spec = load_spec("sources")
    exp = ExperimentPaths(store, spec.name)
    seen = 0
    for arm in spec.arms:
        mixture = exp.arm(arm.name).mixture
        for split in ("train", "validation"):
            for row in storage.Dataset(storage.join(mixture, split)).read_all().to_pylist():
                seen += 1
                assert index.check(row) is None, (arm.name, row["question_id"])
                held = {im["sha256"] for im in row["images"] or []} & lab_images
                assert not held, (arm.name, row["question_id"])  # no held-out classification image
    assert seen > 100
    # ... while the base run's removed items do match the registry (the check can fail).
    removed = storage.Dataset(RunPaths(store, spec.base_run).removed).read_all().to_pylist()
    assert removed and all(index.check(r) is not None for r in removed[:20])
    # The held-out imaging classification: the training questions showing its images were removed.
    by_lab = [r for r in removed if {im["sha256"] for im in r["images"] or []} & lab_images]
    assert by_lab and all(index.check(r).benchmark == "imaging_cls_lab" for r in by_lab)
    assert {r["source"] for r in by_lab} == {"imaging", "pmc_vqa"}  # imaging_modality, figure_mcq


def test_selection_first_k_is_nested_groups_and_bands_and_fingerprints(lab, tmp_path: Path) -> None:
    _, store, _ = lab
    base = RunPaths(store, load_spec("sources").base_run)

    def keys(arm: Arm) -> tuple[set[tuple[str, int]], str]:
        data = select_arm(base, arm, str(tmp_path / arm.name))
        rows = storage.Dataset(data.uri).read_all(["question_id", "sample_idx"]).to_pylist()
        assert len(rows) == data.traces
        return {(r["question_id"], r["sample_idx"]) for r in rows}, data.fingerprint

    accepted = storage.Dataset(base.accepted).read_all(["question_id", "sample_idx"]).to_pylist()
    every = {(r["question_id"], r["sample_idx"]) for r in accepted}
    first: dict[str, list[int]] = defaultdict(list)
    for r in accepted:
        first[r["question_id"]].append(r["sample_idx"])
    everything, f_all = keys(Arm(name="all"))
    fingerprints = []
    for mode in ("first_k_drawn", "first_k_accepted"):
        k1, f1 = keys(Arm(name="k1", samples_per_question=1, k_mode=mode))
        k4, f4 = keys(Arm(name="k4", samples_per_question=4, k_mode=mode))
        k16, f16 = keys(Arm(name="k16", samples_per_question=16, k_mode=mode))
        assert k1 <= k4 < k16 <= everything and len({f1, f4, f16}) == 3, mode
        fingerprints.append((f1, f4))
        if mode == "first_k_drawn":  # the paper's: the accepted traces among the first k samples drawn
            for k, kept in ((1, k1), (4, k4), (16, k16)):
                assert kept == {(q, i) for q, i in every if i < k}, k
        else:  # the first k accepted traces by sample index
            per_q: dict[str, list[int]] = defaultdict(list)
            for q, i in k4:
                per_q[q].append(i)
            assert all(sorted(per_q[q]) == sorted(first[q])[:4] for q in first)
    # The lab's sandbox rejects some samples, so the two meanings of k keep different traces.
    assert fingerprints[0] != fingerprints[1]
    # The same data under another name: the same fingerprint.
    _, f_groups = keys(Arm(name="groups", sources=["text", "multimodal", "classification"]))
    assert f_groups == f_all == f16  # no question has more than 16 samples
    # A pass-rate band keeps exactly the questions whose rate lies in it.
    verdicts = storage.Dataset(base.verdicts).read_all(["question_id", "correct", "reject_reason"])
    judged = verdicts.filter(
        pc.invert(pc.equal(pc.fill_null(verdicts["reject_reason"], ""), "request_failed"))
    )
    rate: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in judged.to_pylist():
        rate[r["question_id"]][0] += r["correct"]
        rate[r["question_id"]][1] += 1
    hard, _ = keys(Arm(name="hard", pass_rate=(0.0, 0.3)))  # [0, 0.3): half-open
    assert {q for q, _ in hard} == {q for q, (c, n) in rate.items() if c and c / n < 0.3}
    with pytest.raises(ConfigError, match="have no accepted traces in the base run"):
        select_arm(base, Arm(name="x", sources=["no-such-source"]), str(tmp_path / "x"))


def test_a_rerun_reuses_finished_arms_and_one_arm_can_be_rerun_alone(prefect_api, lab) -> None:
    tmp, store, _ = lab
    exp = ExperimentPaths(store, "sources")
    before = {a: json.loads(Path(exp.record(a)).read_text()) for a in ("text", "multimodal", "all")}
    again = _cli("sources", "--store", store, home=tmp / "prefect", api=prefect_api)
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stdout + again.stderr
    assert all(f"arm {a}: finished before" in said for a in ("text", "multimodal", "classification", "all"))
    after = {a: json.loads(Path(exp.record(a)).read_text()) for a in before}
    assert after == before  # nothing trained again
    alone = _cli(
        "sources", "--store", store, "--arm", "text", "--force", home=tmp / "prefect", api=prefect_api
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    text = json.loads(Path(exp.record("text")).read_text())
    assert text["updated_at"] > before["text"]["updated_at"] and text["data"] == before["text"]["data"]
    assert not text["train"].get("trained_already"), text["train"]  # --force trained it again
    assert json.loads(Path(exp.record("all")).read_text()) == before["all"]


def test_a_failed_arm_leaves_the_others_in_the_report_and_names_how_to_rerun_it(
    prefect_api, lab, tmp_path: Path
) -> None:
    tmp, store, _ = lab
    spec = tmp_path / "broken.yaml"
    spec.write_text(
        "name: broken\nrecipe: lab\nbase_run: lab-base\nreference: ok\ntraining: {max_steps: 1}\n"
        "evaluation: {seeds: 1}\narms:\n  - {name: ok, sources: [classification]}\n"
        "  - {name: empty, sources: [classification], pass_rate: [0.0, 0.0]}\n"
    )
    proc = _cli(str(spec), "--store", store, home=tmp / "prefect", api=prefect_api)
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "arm(s) empty failed" in error[0] and "--arm empty" in error[0]
    exp = ExperimentPaths(store, "broken")
    assert json.loads(Path(exp.record("ok")).read_text())["status"] == "COMPLETED"
    assert json.loads(Path(exp.record("empty")).read_text())["status"] == "FAILED"
    assert "| ok | COMPLETED |" in Path(exp.report).read_text()


def test_same_epochs_trains_epochs_not_the_recipes_max_steps(prefect_api, lab, tmp_path: Path) -> None:
    """Review finding: under same_epochs the recipe's max_steps (2 in the lab recipe) still won."""
    tmp, store, _ = lab
    spec = tmp_path / "epochs.yaml"
    spec.write_text(
        "name: epochs\nrecipe: lab\nbase_run: lab-base\nreference: cls\ncontrol: same_epochs\n"
        "training: {num_train_epochs: 1, report_to: none}\nevaluation: {seeds: 1}\narms:\n"
        "  - {name: cls, sources: [classification]}\n  - {name: cls1, sources: [classification], samples_per_question: 1}\n"
    )
    proc = _cli(str(spec), "--store", store, "--arm", "cls", home=tmp / "prefect", api=prefect_api)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(Path(ExperimentPaths(store, "epochs").record("cls")).read_text())
    rows = record["mixture"]["train_rows"]
    assert rows > 4 and record["train"]["steps"] > 2  # one epoch over the rows at batch 2
    # One epoch sees every exported row: the mixture's rows less the duplicates the export drops
    # once the answer line is normalised (issue 24).
    exported = json.loads(Path(ExperimentPaths(store, "epochs").arm("cls").export_summary).read_text())
    assert record["train"]["samples_seen"] >= rows - exported["duplicates"]["train"] > 4
    report = Path(ExperimentPaths(store, "epochs").report).read_text()
    assert "| cls1 | NOT RUN |" in report


def test_a_changed_setting_makes_other_arms_stale_in_the_report(prefect_api, lab, tmp_path: Path) -> None:
    """Review finding: the report mixed arms trained under other settings with the current ones."""
    tmp, store, _ = lab
    changed = load_spec("sources").model_dump(mode="json")
    changed["training"]["max_steps"] = 3
    import yaml

    spec = tmp_path / "sources.yaml"
    spec.write_text(yaml.safe_dump(changed))
    proc = _cli(str(spec), "--store", store, "--arm", "classification", home=tmp / "prefect", api=prefect_api)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = ExperimentPaths(store, "sources")
    report = Path(exp.report).read_text()
    assert "| classification | COMPLETED |" in report and "| all | STALE |" in report
    assert json.loads(Path(exp.record("classification")).read_text())["train"]["steps"] == 3
    comparison = json.loads(Path(exp.comparison).read_text())
    assert all(r["mean"] is None for r in comparison["accuracy"] if r["arm"] == "all")


def test_arms_with_identical_data_and_training_train_once(prefect_api, lab, tmp_path: Path) -> None:
    """cot vs direct prompting: one checkpoint, evaluated under each arm's prompting. A truly direct
    arm (answer-only training data) has another data fingerprint: its own checkpoint, trained on
    exports with no reasoning, evaluated with no ``<think>`` prefill."""
    tmp, store, _ = lab
    spec = tmp_path / "twins.yaml"
    spec.write_text(
        "name: twins\nrecipe: lab\nbase_run: lab-base\nreference: cot\ntraining: {max_steps: 1, report_to: none}\n"
        "evaluation: {seeds: 1, benchmarks: [medqa, imaging_cls_lab]}\narms:\n"
        "  - {name: cot, sources: [classification], evaluation: {prompting: cot}}\n"
        "  - {name: direct, sources: [classification], evaluation: {prompting: direct}}\n"
        "  - {name: answer, sources: [classification], export: answer_only, evaluation: {prompting: direct}}\n"
    )
    proc = _cli(str(spec), "--store", store, home=tmp / "prefect", api=prefect_api)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "arm direct: same data and training as arm cot: its checkpoint, not trained again" in said
    exp = ExperimentPaths(store, "twins")
    cot, direct = (json.loads(Path(exp.record(a)).read_text()) for a in ("cot", "direct"))
    assert cot["trained_by"] == "cot" and direct["trained_by"] == "cot" and direct["train"] == cot["train"]
    assert direct["evaluation"]["checkpoint"] == cot["evaluation"]["checkpoint"] == exp.arm("cot").checkpoints
    assert not Path(exp.arm("direct").checkpoints).exists()  # never trained
    versions = {
        a: set(
            storage.Dataset(r["evaluation"]["predictions_uri"])
            .read_all(["prompt_version"])
            .column(0)
            .to_pylist()
        )
        for a, r in (("cot", cot), ("direct", direct))
    }
    assert versions["cot"] != versions["direct"]  # each evaluated with its own prompting
    comparison = json.loads(Path(exp.comparison).read_text())
    assert comparison["shared_checkpoints"] == [["cot", "direct"]]
    assert "Arms sharing one checkpoint" in Path(exp.report).read_text()
    # The held-out classification benchmark is scored: a classification group per arm, recomputed.
    groups = {(g["arm"], g["group"]): g for g in comparison["groups"]}
    for arm, rec in (("cot", cot), ("direct", direct)):
        assert groups[(arm, "classification")]["benchmarks"] == 1
        recomputed = _groups_from_predictions(rec["evaluation"])
        assert groups[(arm, "classification")]["mean"] == pytest.approx(recomputed["classification"])
        assert groups[(arm, "text")]["mean"] == pytest.approx(recomputed["text"])
    # The answer-only arm: same traces, other data, its own checkpoint.
    answer = json.loads(Path(exp.record("answer")).read_text())
    assert answer["data"]["traces"] == cot["data"]["traces"] and answer["data"]["content"] == "answer_only"
    assert answer["data"]["fingerprint"] != cot["data"]["fingerprint"] and answer["trained_by"] == "answer"
    assert (
        answer["evaluation"]["checkpoint"] == exp.arm("answer").checkpoints != cot["evaluation"]["checkpoint"]
    )
    assert (
        comparison["data"]["answer"]["content"] == "answer_only"
        and comparison["data"]["cot"]["content"] == "reasoning"
    )
    for arm, think in (("answer", False), ("cot", True)):
        for fmt in ("llamafactory", "trl/vision"):
            rows = storage.Dataset(storage.join(exp.arm(arm).export, fmt, "train")).read_all(["messages"])
            replies = [m[-1]["content"] for m in rows.column(0).to_pylist()]
            replies = [r if isinstance(r, str) else r[0]["text"] for r in replies]
            assert replies and all(("<think>" in r) is think for r in replies), (arm, fmt)
    for arm, rec in (("answer", answer), ("direct", direct), ("cot", cot)):
        metrics = json.loads(Path(rec["evaluation"]["report_uri"]).with_name("metrics.json").read_text())
        assert metrics["protocol"]["prefill_think"] is (arm == "cot")  # the lab recipe prefills for cot


def test_learning_curves_evaluate_intermediate_checkpoints_and_recompute(
    prefect_api, lab, tmp_path: Path
) -> None:
    """Issue 22: ``evaluation.every_steps`` evaluates the checkpoint saved every N steps with the
    arm's protocol; comparison.json's learning curves (accuracy against examples seen, plotted in
    learning_curves.png) recompute from each checkpoint's predictions file."""
    tmp, store, _ = lab
    spec = tmp_path / "curves.yaml"
    spec.write_text(
        "name: curves\nrecipe: lab\nbase_run: lab-base\nreference: cls\ntraining: {max_steps: 2, report_to: none}\n"
        "evaluation: {seeds: 2, benchmarks: [medqa, imaging_cls_lab], every_steps: 1}\narms:\n"
        "  - {name: cls, sources: [classification]}\n"
        "  - {name: cls-k1, sources: [classification], samples_per_question: 1}\n"
    )
    proc = _cli(str(spec), "--store", store, home=tmp / "prefect", api=prefect_api)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = ExperimentPaths(store, "curves")
    comparison = json.loads(Path(exp.comparison).read_text())
    assert set(comparison["learning_curves"]) == {"cls", "cls-k1"}
    png = Path(exp.curves_plot).read_bytes()
    assert png.startswith(b"\x89PNG") and "## Learning curves" in Path(exp.report).read_text()
    for arm, points in comparison["learning_curves"].items():
        record = json.loads(Path(exp.record(arm)).read_text())
        assert [p["step"] for p in points] == [1, 2]
        # Examples seen: examples trained on up to each checkpoint (packed rows count their examples).
        seen = [p["examples"] for p in points]
        assert 0 < seen[0] < seen[1] == record["train"]["samples_seen"]
        assert points[-1]["predictions_uri"] == record["evaluation"]["predictions_uri"]
        assert points[0]["predictions_uri"] != points[1]["predictions_uri"]
        assert "/steps/step-000001/" in points[0]["predictions_uri"]
        for p in points:  # every plotted number from the predictions file
            per_bench = _accuracy_from_predictions(p["predictions_uri"])
            assert set(per_bench) == {"medqa", "imaging_cls_lab"}
            means = {b: sum(s.values()) / len(s) for b, s in per_bench.items()}
            assert p["per_benchmark"] == pytest.approx(means)
            assert p["accuracy"] == pytest.approx(sum(means.values()) / len(means))


def test_teachers_distil_the_same_questions_once_each_and_are_compared(
    prefect_api, lab, tmp_path: Path
) -> None:
    """Issue 22: a spec's teachers each distil the base questions once (run <base_run>-<teacher>, the
    recipe with the teacher's overrides); arms train on each teacher's traces; the report's teacher
    table has each teacher's pass rate, reasoning length and (simulated) cost, recomputed here from
    the teacher runs' own files, and the arm's downstream accuracy."""
    tmp, store, _ = lab
    spec = tmp_path / "teachers.yaml"
    spec.write_text(
        "name: teachers\nrecipe: lab\nbase_run: lab-base\nreference: cheap\n"
        "training: {max_steps: 1, report_to: none}\nevaluation: {seeds: 1, benchmarks: [medqa]}\n"
        "teachers:\n"
        "  - {name: cheap, overrides: {teachers: [{name: cheap, price_prompt_per_1m: 0.5, price_completion_per_1m: 2.0}]}}\n"
        "  - name: dear\n"
        "    overrides: {teachers: [{name: dear, price_prompt_per_1m: 5.0, price_completion_per_1m: 20.0}],"
        " distill: {seed: 1, sandbox: {faults: {truncated: 0.3}}}}\n"
        "arms:\n"
        "  - {name: cheap, sources: [classification], teacher_run: cheap}\n"
        "  - {name: dear, sources: [classification], teacher_run: dear}\n"
    )
    proc = _cli(str(spec), "--store", store, home=tmp / "prefect", api=prefect_api)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = ExperimentPaths(store, "teachers")
    comparison = json.loads(Path(exp.comparison).read_text())
    table = {t["arm"]: t for t in comparison["teachers"]}
    base_questions = set(
        storage.Dataset(RunPaths(store, "lab-base").questions).read_all(["question_id"]).column(0).to_pylist()
    )
    for name, price in (("cheap", (0.5, 2.0)), ("dear", (5.0, 20.0))):
        run = RunPaths(store, f"lab-base-{name}")
        # The same questions as the base run, distilled by this teacher's recipe.
        questions = storage.Dataset(run.questions).read_all(["question_id"]).column(0).to_pylist()
        assert set(questions) == base_questions
        recorded = json.loads(Path(run.run_json).read_text())["recipe"]["teachers"][0]
        assert (recorded["name"], recorded["price_prompt_per_1m"]) == (name, price[0])
        verdicts = storage.Dataset(run.verdicts).read_all(["question_id"]).column(0).to_pylist()
        accepted = storage.Dataset(run.accepted).read_all(["completion_tokens"]).column(0).to_pylist()
        cost = json.loads(Path(run.cost).read_text())
        t = table[name]
        assert t["run_id"] == f"lab-base-{name}" and t["accepted"] == len(accepted)
        assert t["pass_rate"] == pytest.approx(len(accepted) / len(verdicts), abs=1e-4)
        assert t["completion_tokens"] == pytest.approx(sum(accepted) / len(accepted), abs=0.05)
        assert t["simulated"] is True and t["cost_usd"] == pytest.approx(cost["simulated_usd"])
        tokens = cost["total_prompt_tokens"], cost["total_completion_tokens"]
        assert t["cost_usd"] == pytest.approx((tokens[0] * price[0] + tokens[1] * price[1]) / 1e6, rel=1e-6)
        record = json.loads(Path(exp.record(name)).read_text())
        assert t["accuracy"] == pytest.approx(
            sum(_accuracy_from_predictions(record["evaluation"]["predictions_uri"])["medqa"].values())
        )
    assert table["dear"]["pass_rate"] < table["cheap"]["pass_rate"]  # a share of its replies cut off
    fingerprints = {comparison["data"][a]["fingerprint"] for a in ("cheap", "dear")}
    assert len(fingerprints) == 2 and "## Teachers" in Path(exp.report).read_text()


def test_sft_vs_rl_trains_sft_once_then_grpo_and_a_rerun_trains_nothing(prefect_api, lab) -> None:
    """Issue 27, the lab's "sft vs sft+rl": both arms share one SFT training, the sft_rl arm runs
    GRPO from the sft arm's SFT checkpoint on the base run's RL prompts and is evaluated on the RL
    checkpoint with the same protocol; the comparison has both; a second run trains nothing."""
    from octomed_data.layout import RLFolder

    tmp, store, _ = lab
    proc = _cli("sft_vs_rl", "--store", store, home=tmp / "prefect", api=prefect_api)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    said = proc.stdout + proc.stderr
    assert "arm sft_rl: same data and training as arm sft: its checkpoint, not trained again" in said
    exp = ExperimentPaths(store, "sft_vs_rl")
    sft, rl = (json.loads(Path(exp.record(a)).read_text()) for a in ("sft", "sft_rl"))
    assert sft["status"] == rl["status"] == "COMPLETED"
    assert sft["trained_by"] == rl["trained_by"] == "sft" and rl["train"] == sft["train"]
    assert not Path(exp.arm("sft_rl").checkpoints).exists()  # SFT trained once, by the sft arm
    job = rl["rl"]
    # The GRPO job started from the sft arm's SFT checkpoint (the one the sft arm evaluated) ...
    assert job["sft_checkpoint"] == sft["evaluation"]["checkpoint"] == exp.arm("sft").checkpoints
    sft_marker = json.loads(Path(exp.arm("sft").checkpoints, "checkpoint.json").read_text())
    rl_marker = json.loads(Path(job["checkpoint"], "checkpoint.json").read_text())
    assert rl_marker["config_hash"] == job["config_hash"] and rl_marker["step"] == job["trainer"]["max_steps"]
    assert rl_marker["settings"]["inputs"]["sft"]["config_hash"] == sft_marker["config_hash"]
    assert rl_marker["settings"]["inputs"]["sft"]["uri"] == exp.arm("sft").checkpoints
    assert job["job"]["steps"] == 2 and job["job"]["trained_already"] is False and job["job"]["prompts"] > 0
    steps = [json.loads(line)["step"] for line in Path(job["metrics_uri"]).read_text().splitlines()]
    assert steps == [1, 2]
    # ... on the base run's RL prompts, into the arm's own rl/ folder, and is what the arm evaluated.
    assert job["data_fingerprint"] and Path(RLFolder(RunPaths(store, "lab-base").rl).data_done).exists()
    assert rl["evaluation"]["checkpoint"] == job["checkpoint"] == RLFolder(exp.arm("sft_rl").rl).checkpoints
    # The lab's comparison: both arms, sft_rl's Δ against sft recomputed from the predictions.
    comparison = json.loads(Path(exp.comparison).read_text())
    report = Path(exp.report).read_text()
    assert "| sft | COMPLETED |" in report and "| sft_rl | COMPLETED |" in report
    assert comparison["data"]["sft_rl"]["trained_by"] == "sft + RL" and comparison["shared_checkpoints"] == []
    per_seed = _accuracy_from_predictions(rl["evaluation"]["predictions_uri"])
    assert set(per_seed) == {"medqa", "vqa_rad", "imaging_cls_lab"}
    for bench in per_seed:
        (row,) = [r for r in comparison["accuracy"] if r["arm"] == "sft_rl" and r["benchmark"] == bench]
        diff = _paired_matrix(rl["evaluation"], sft["evaluation"], bench)
        assert row["delta"] == pytest.approx(float(diff.mean()))
        assert (row["ci_low"], row["ci_high"]) == tuple(
            paired_bootstrap([diff])[k] for k in ("ci_low", "ci_high")
        )
    # A second run trains nothing: both arms reused, the RL job's record and checkpoint untouched.
    rl_state = Path(exp.arm("sft_rl").state_uri("rl", job["config_hash"]))
    stamps = {p: p.stat().st_mtime_ns for p in (rl_state, Path(job["checkpoint"], "checkpoint.json"))}
    again = _cli("sft_vs_rl", "--store", store, home=tmp / "prefect", api=prefect_api)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    said = again.stdout + again.stderr
    assert all(f"arm {a}: finished before" in said for a in ("sft", "sft_rl")), said[-3000:]
    assert "GRPO from the SFT checkpoint" not in said
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads(Path(exp.record("sft_rl")).read_text())["updated_at"] == rl["updated_at"]
