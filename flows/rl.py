"""Reinforcement learning after SFT (issue 27): RL prompts -> GRPO job -> evaluation -> SFT vs SFT+RL.

``rl_flow`` runs, on an existing run with a finished SFT checkpoint: the RL data step
(``RLDataStage``: prompts with gold answers in the pass-rate band, never a benchmark item), the
GRPO job (``training.rl_stage.RLStage``: exactly once per SFT checkpoint, RL data and settings;
a second trigger trains nothing), the evaluation of the RL checkpoint with the harness and
protocol of SFT's (``flows.train.eval_config``, written to ``rl/evaluate``), and
``rl/sft_vs_rl.md``: per benchmark, SFT vs SFT+RL accuracy with the lab's paired bootstrap
interval (``octomed_data.experiment.compare``). The ``rl`` deployment is its dashboard form; the
automation starts it after a finished train flow run when the run's recipe says ``rl.enabled``.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from prefect import flow, get_run_logger, task
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flows.common import RunParams, prepare, publish_markdown
from flows.train import TrainRunParams, eval_config, evaluate_task, existing_run, local_dir, run_global
from octomed_data import storage
from octomed_data.experiment.compare import ci_text, item_outcomes, paired_bootstrap, signed
from octomed_data.layout import RLFolder, RunPaths
from octomed_data.recipe import Recipe


class RLParams(BaseModel):
    """The RL form in the UI: the run (with a finished SFT checkpoint) and the common GRPO knobs."""

    model_config = ConfigDict(extra="forbid")

    run: TrainRunParams = Field(default_factory=TrainRunParams)
    max_steps: int | None = Field(None, ge=1, description="GRPO steps. Empty: the recipe's rl.trainer.")
    learning_rate: float | None = Field(None, gt=0)
    num_generations: int | None = Field(None, ge=2, description="Completions per prompt (the group).")
    launcher: Literal["inprocess", "auto", "torchrun", "deepspeed"] = Field(
        "inprocess", description="inprocess: this process (CPU smoke); auto = torchrun, one process per GPU."
    )
    processes: int | None = Field(None, ge=1, description="Processes on this node. Empty: one per GPU.")
    evaluate: bool = Field(True, description="Evaluate the RL checkpoint and compare it with SFT's.")
    only_if_enabled: bool = Field(
        False,
        description="Train only when the run's recipe says rl.enabled (what the automation after a "
        "train run asks); off: this form's trigger trains whatever the recipe says.",
    )

    @field_validator("run", mode="before")
    @classmethod
    def _run(cls, v: Any) -> Any:
        return v.model_dump() if isinstance(v, RunParams) else v


work_dir = local_dir  # the one rule for a job's local folder (flows.train)


def sft_checkpoint(paths: RunPaths) -> str:
    """The run's registered SFT checkpoint (a forced job's folder included), else its default one."""
    if storage.exists(paths.checkpoint_record):
        return str(storage.read_json(paths.checkpoint_record).get("checkpoint_uri") or paths.checkpoints)
    return paths.checkpoints


@task(name="rl-data", retries=0)
def rl_data_task(paths: RunPaths, recipe: Recipe) -> dict[str, Any]:
    from octomed_data.stages.rl_data import RLDataStage

    return run_global(RLDataStage(paths, recipe.rl)).counts


@task(name="grpo", retries=0)
def grpo_task(job: Any, launcher: str, processes: int | None) -> dict[str, Any]:
    """The GRPO job (long and stateful: no automatic retry; a re-run resumes from its checkpoints)."""
    from training.rl_stage import launch_rl

    return launch_rl(job, launcher=launcher, processes=processes, on_line=get_run_logger().info)


def comparison_markdown(sft_predictions: str, rl_predictions: str, title: str) -> tuple[str, list[dict]]:
    """SFT vs SFT+RL per benchmark: accuracy of each on the items and seeds both answered, the
    paired difference and its bootstrap interval (the lab's), and the same over all benchmarks."""
    sft, rl = item_outcomes(sft_predictions), item_outcomes(rl_predictions)
    rows, diffs = [], []
    for bench in sorted(set(sft) & set(rl)):
        a, r = rl[bench], sft[bench]
        items = sorted(set(a["items"]) & set(r["items"]))
        seeds = sorted(set(a["seeds"]) & set(r["seeds"]))

        def pick(o: dict[str, Any], items: list = items, seeds: list = seeds) -> np.ndarray:
            ri = {q: i for i, q in enumerate(o["items"])}
            ci = {s: j for j, s in enumerate(o["seeds"])}
            return o["correct"][np.ix_([ri[q] for q in items], [ci[s] for s in seeds])]

        if not items or not seeds:
            continue
        base, after = pick(r), pick(a)
        diff = after - base
        diffs.append(diff)
        boot = paired_bootstrap([diff])
        rows.append(
            {
                "benchmark": bench,
                "items": len(items),
                "seeds": len(seeds),
                "sft": float(np.nanmean(base)),
                "sft_rl": float(np.nanmean(after)),
            }
            | boot
        )
    overall = paired_bootstrap(diffs)
    lines = [
        f"# {title}",
        "",
        "Paired per (item, seed) both answered; Δ in percent points, 95% bootstrap interval over items "
        "and seeds (the lab's `paired_bootstrap`).",
        "",
        "| benchmark | items | seeds | SFT | SFT+RL | Δ (pp) | 95% CI | beyond noise |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['benchmark']} | {row['items']} | {row['seeds']} | {100 * row['sft']:.1f} | "
            f"{100 * row['sft_rl']:.1f} | {signed(row['delta'])} | {ci_text(row)} | "
            f"{'yes' if row['beyond_noise'] else 'no'} |"
        )
    lines.append(
        f"| **mean over benchmarks** | | | | | {signed(overall['delta'])} | {ci_text(overall)} | "
        f"{'yes' if overall['beyond_noise'] else 'no'} |"
    )
    if not rows:
        lines += ["", "_No benchmark was evaluated for both checkpoints: nothing to compare._"]
    return "\n".join(lines) + "\n", rows


def publish_rl(paths: RunPaths, result: dict[str, Any]) -> None:
    """The GRPO job's card: its result and the reward / response-length plot (inline)."""
    rl = RLFolder(paths.rl)
    lines = [f"# RL (GRPO) after SFT, run `{paths.run_id}`", ""]
    lines += [f"- **{k}**: {v}" for k, v in result.items() if not isinstance(v, dict)]
    if storage.exists(rl.plot):
        png = base64.b64encode(storage.read_bytes(rl.plot)).decode("ascii")
        lines += ["", f"![reward and response length over steps](data:image/png;base64,{png})"]
    publish_markdown("rl", paths, "\n".join(lines), f"RL after SFT, run {paths.run_id}")


@flow(name="rl", log_prints=True)
def rl_flow(params: RLParams = RLParams()) -> dict[str, Any]:
    """RL data -> GRPO on the run's SFT checkpoint (exactly once) -> evaluation -> SFT vs SFT+RL."""
    from octomed_data.errors import ConfigError
    from training.rl_stage import RLStage, check_rewards, rl_job, sft_identity
    from training.stage import ALREADY

    if not params.run.run_id:
        raise ConfigError("rl needs run.run_id: the run with a finished SFT checkpoint (nothing was created)")
    found = existing_run(params.run)
    recipe, paths = prepare(
        RunParams(recipe_path=params.run.recipe_path, run_id=found.run_id, store=found.store)
    )
    rl = RLFolder(paths.rl)
    if params.only_if_enabled and not recipe.rl.enabled:
        print(f"rl: run {paths.run_id}'s recipe leaves rl.enabled off; nothing to do")
        return {"run_id": paths.run_id, "skipped": True, "enabled": False}
    check_rewards(recipe)
    sft = sft_checkpoint(paths)
    sft_identity(sft)  # one line before anything is written when the run has no finished SFT checkpoint
    data = rl_data_task(paths, recipe)
    print(f"rl: RL prompts {data}")
    overrides = {k: getattr(params, k) for k in ("max_steps", "learning_rate", "num_generations")}
    job = rl_job(recipe, paths, sft_checkpoint=sft, work_dir=work_dir(paths, "rl-work"), overrides=overrides)
    stage = RLStage(
        paths, job, lambda: grpo_task(job, params.launcher, params.processes), owner=_flow_run_id()
    )
    out: dict[str, Any] = {"run_id": paths.run_id, "data": data, "key": stage.key}
    other = stage.trained_elsewhere()
    if other:
        print(f"rl: another job ({other}) trains {stage.key} now; nothing to do")
        return out | {"skipped": True}
    outcome = run_global(stage)
    if outcome.state == "REUSED" or outcome.counts.get(ALREADY) or outcome.counts.get("trained_already"):
        print(f"rl: {stage.key} is trained with these settings already; nothing to train")
        out["skipped"] = True
    else:
        publish_rl(paths, outcome.counts)
    out["rl"] = outcome.counts
    if not params.evaluate:
        return out
    sft_eval = evaluate_task(paths, eval_config(recipe, paths, sft))
    rl_config = eval_config(recipe, paths, rl.checkpoints).model_copy(update={"output_uri": rl.evaluation})
    rl_eval = evaluate_task(paths, rl_config)
    markdown, rows = comparison_markdown(
        sft_eval["predictions_uri"], rl_eval["predictions_uri"], f"SFT vs SFT+RL, run {paths.run_id}"
    )
    storage.write_bytes(rl.comparison, markdown.encode("utf-8"))
    publish_markdown("rl-comparison", paths, markdown, f"SFT vs SFT+RL, run {paths.run_id}")
    print(f"rl: comparison at {rl.comparison}")
    return out | {"evaluate_sft": sft_eval, "evaluate_rl": rl_eval, "comparison": rows}


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return str(flow_run.id or "") or None
