"""RL after SFT through the Prefect flows on the tiny model: SFT (train flow) -> RL prompts -> GRPO
with the factory's verifier as the reward -> evaluation -> SFT vs SFT+RL; a second trigger trains
nothing; the ``rl`` command exits truthfully."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from octomed_data import storage
from octomed_data.layout import CheckpointFolder, RLFolder, RunPaths
from octomed_data.recipe import Recipe, load_recipe
from octomed_data.runs import start_run
from octomed_data.schema import QUESTION_SCHEMA, REMOVED_SCHEMA, VERDICT_SCHEMA, question_row
from tests.support.flows import artifact_keys
from tests.support.sft import weights_hash

GOLD_LINE = "Final answer: \\boxed{A}"


def _recipe(store: str) -> Recipe:
    data = load_recipe("demo").model_dump(mode="json")
    data["store"] = store
    data["training"] = {
        "enabled": True,
        "tiny_model": "text",
        "launcher": "inprocess",
        "config": {
            "max_steps": 1,
            "global_batch_size": 1,
            "max_seq_len": 256,
            "zero_stage": 0,
            "gradient_checkpointing": False,
        },
    }
    data["evaluation"] = {
        "enabled": True,
        "benchmarks": ["medqa"],
        "data_dir": "package:sample_data/eval",
        "config": {"seeds": 2, "max_new_tokens": 8, "limit": 2, "batch_size": 2, "prefill_think": False},
    }
    data["rl"] = {
        "enabled": True,
        "validation_fraction": 0.0,
        "trainer": {
            "max_steps": 2,
            "num_generations": 2,
            "per_device_train_batch_size": 2,
            "max_completion_length": 16,
            "learning_rate": 1e-5,
        },
    }
    return Recipe.model_validate(data)


def _question(i: int) -> dict:
    return question_row(
        source="medmcqa",
        split="train",
        task_type="text_mcq",
        question=f"Which drug is first-line for case {i}?",
        options={"A": "aspirin", "B": "heparin"},
        answer="A",
        input_file="q.jsonl",
        record_index=i,
    )


def _verdict(q: dict, k: int, correct: bool) -> dict:
    row = {f.name: None for f in VERDICT_SCHEMA}
    return row | {
        "question_id": q["question_id"],
        "source": q["source"],
        "task_type": q["task_type"],
        "sample_idx": k,
        "teacher": "t",
        "model": "m",
        "gold_answer": q["answer"],
        "correct": correct,
        "reject_reason": None if correct else "wrong_answer",
        "reasoning_chars": 1,
        "reasoning_words": 1,
    }


def build_run(store: Path) -> RunPaths:
    """A run as the factory leaves it before training: decontaminated questions, the filter's
    verdicts (4 samples each: 6 questions at pass rate 0.5, 2 at 1.0), and a text TRL export."""
    paths = start_run(_recipe(str(store)), "rl1", str(store))
    questions = [_question(i) for i in range(8)]
    storage.Dataset(paths.questions, QUESTION_SCHEMA).write_shard(
        "00000", pa.Table.from_pylist(questions, QUESTION_SCHEMA)
    )
    verdicts = [_verdict(q, k, k < (4 if i >= 6 else 2)) for i, q in enumerate(questions) for k in range(4)]
    storage.Dataset(paths.verdicts, VERDICT_SCHEMA).write_shard(
        "00000", pa.Table.from_pylist(verdicts, VERDICT_SCHEMA)
    )
    storage.Dataset(paths.removed, REMOVED_SCHEMA).write_shard("00000", REMOVED_SCHEMA.empty_table())
    conversations = [
        [
            {"role": "user", "content": q["question"] + "\nA. aspirin\nB. heparin"},
            {"role": "assistant", "content": "<think>\nAspirin.\n</think>\n\n" + GOLD_LINE},
        ]
        for q in questions
    ]
    storage.Dataset(paths.trl_split(True, "train")).write_shard(0, pa.table({"messages": conversations}))
    return paths


@pytest.fixture(scope="module")
def rl_run(prefect_harness, tmp_path_factory):
    """SFT through the train flow, then RL through the rl flow, with the reward calls recorded."""
    import octomed_data.rl.reward as reward
    from flows.common import RunParams
    from flows.rl import RLParams, rl_flow
    from flows.train import TrainParams, train_flow

    paths = build_run(tmp_path_factory.mktemp("rl") / "store")
    run = RunParams(run_id=paths.run_id, store=paths.store)
    sft = train_flow(TrainParams(run=run, launcher="inprocess", evaluate=False))
    calls: list[tuple[list, list[float]]] = []
    real = reward.reward_functions

    def recording(*args, **kwargs):
        fns = real(*args, **kwargs)

        def correctness(prompts=None, completions=(), **columns):
            scores = fns[0](prompts, completions, **columns)
            calls.append((list(completions), list(scores)))
            return scores

        return [correctness, *fns[1:]]

    mp = pytest.MonkeyPatch()
    mp.setattr(reward, "reward_functions", recording)
    try:
        out = rl_flow(RLParams(run=run))
    finally:
        mp.undo()
    return paths, sft, out, calls


def test_sft_then_rl_then_evaluation_with_the_factorys_verifier_as_the_reward(rl_run) -> None:
    from octomed_data.rl.reward import reward_functions

    paths, sft, out, calls = rl_run
    rl = RLFolder(paths.rl)
    assert sft["train"]["steps"] == 1
    # The RL prompts: the 6 questions inside the (0, 1) band; the 2 every sample solved are out.
    assert storage.Dataset(rl.split("train")).num_rows() == 6
    assert out["rl"]["steps"] == 2 and not out["rl"]["trained_already"]
    marker = storage.read_json(CheckpointFolder(rl.checkpoints).marker)
    assert marker["final"] and marker["step"] == 2 and marker["kind"] == "grpo"
    assert marker["settings"]["inputs"]["sft"]["uri"] == paths.checkpoints
    # Every logged step's pass rate is the mean of the verifier's scores of that step's rollouts.
    metrics = [json.loads(x) for x in storage.read_bytes(rl.metrics).decode().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and len(calls) == 2
    for m, (completions, scores) in zip(metrics, calls, strict=True):
        assert len(completions) == 2  # per_device_train_batch_size completions: 1 prompt x 2 generations
        assert m["pass_rate"] == pytest.approx(sum(scores) / len(scores))
        assert m["completion_length_mean"] > 0
    # The same reward, on the gold answer line and on a wrong one.
    correctness = reward_functions()[0]
    row = next(storage.Dataset(rl.split("train")).iter_rows())
    columns = {k: [v, v] for k, v in row.items() if k != "prompt"}
    assert correctness(None, [GOLD_LINE, "Final answer: \\boxed{B}"], **columns) == [1.0, 0.0]
    assert storage.read_bytes(rl.plot)[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((Path(paths.local("rl-work")) / "tensorboard").rglob("events.out.tfevents*"))
    # Evaluated with SFT's protocol (same benchmark, items, seeds), compared in rl/sft_vs_rl.md.
    assert out["evaluate_rl"]["output_uri"] == rl.evaluation
    assert set(out["evaluate_rl"]["per_benchmark"]) == set(out["evaluate_sft"]["per_benchmark"]) == {"medqa"}
    report = storage.read_bytes(rl.comparison).decode()
    assert "| medqa | 2 | 2 |" in report and "95% CI" in report
    assert [r["benchmark"] for r in out["comparison"]] == ["medqa"]
    keys = [f"{k}-{paths.run_id}" for k in ("rl", "rl-comparison")]
    assert artifact_keys(keys) == set(keys)


def test_a_second_trigger_trains_nothing_and_the_cli_says_so(rl_run, capsys) -> None:
    from cli import main
    from flows.common import RunParams
    from flows.rl import RLParams, rl_flow

    paths, _, _, _ = rl_run
    rl = RLFolder(paths.rl)
    before = (weights_hash(rl.checkpoints), storage.read_bytes(rl.metrics))
    again = rl_flow(RLParams(run=RunParams(run_id=paths.run_id, store=paths.store), evaluate=False))
    assert again["skipped"] and again["rl"]["steps"] == 2
    assert (weights_hash(rl.checkpoints), storage.read_bytes(rl.metrics)) == before
    assert storage.read_json(CheckpointFolder(rl.checkpoints).marker)["step"] == 2
    # The command line: the same trigger, nothing trained, exit 0; a run that is not there, exit 2.
    capsys.readouterr()
    assert main(["rl", paths.run_id, "--store", paths.store, "--no-evaluate"]) == 0
    printed = capsys.readouterr().out
    assert "nothing to train" in printed and json.loads(printed.splitlines()[-1])["trained"] is False
    assert weights_hash(rl.checkpoints) == before[0]
    assert main(["rl", "nosuchrun", "--store", paths.store]) == 2
    assert "no run 'nosuchrun'" in capsys.readouterr().err
    # A run without a finished SFT checkpoint: one line, exit 2, nothing written.
    bare = start_run(_recipe(paths.store), "bare", paths.store)
    assert main(["rl", "bare", "--store", paths.store]) == 2
    assert "no finished SFT checkpoint" in capsys.readouterr().err
    assert not storage.exists(RLFolder(bare.rl).data_done)


def test_a_finished_train_run_starts_the_rl_deployment_on_that_run(rl_run) -> None:
    """The automation after SFT: a completed train flow run starts ``rl`` with its run, asking
    the flow to train only where the run's recipe says rl.enabled."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from flows.automation import RL_AUTOMATION_NAME, ensure_rl_automation
    from flows.common import RunParams
    from flows.rl import rl_flow
    from flows.train import TrainParams, train_flow

    paths = rl_run[0]
    deployment_id = rl_flow.to_deployment(name="rl").apply()
    automation = ensure_rl_automation(deployment_id)
    assert automation is not None and automation.name == RL_AUTOMATION_NAME
    time.sleep(2)  # the triggers service loads new automations periodically
    run = RunParams(run_id=paths.run_id, store=paths.store)
    assert train_flow(TrainParams(run=run, launcher="inprocess", evaluate=False))["skipped"]
    runs = []
    deadline = time.time() + 60
    with get_client(sync_client=True) as client:
        while time.time() < deadline and not runs:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )
            time.sleep(1)
    assert runs, "the automation did not start the rl deployment"
    params = runs[0].parameters["params"]
    assert params["run"]["run_id"] == paths.run_id and params["only_if_enabled"] is True
    assert ensure_rl_automation(deployment_id, enabled=False) is None
