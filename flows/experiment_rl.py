"""RL after an arm's SFT in the recipe lab (issue 27): an arm with ``rl: true`` trains (or shares)
its SFT checkpoint as every arm does, then runs GRPO on it once (``training.rl_stage.RLStage``)
on the base run's RL prompts (``RLDataStage`` over the run the arm selects from, the recipe's
``rl:`` block, rebuilt only when its inputs or settings change), with the recipe's ``verify:``
settings as the reward. The RL checkpoint lands in the arm's ``rl/checkpoints`` and is what the
arm evaluates, with the spec's shared protocol, so the lab's comparison sets SFT vs SFT+RL side
by side with nothing new."""

from __future__ import annotations

from typing import Any

from flows.rl import grpo_task, rl_data_task
from flows.train import local_dir, run_global
from octomed_data.experiment import ExperimentSpec
from octomed_data.experiment.arms import ExperimentPaths
from octomed_data.layout import RLFolder, RunPaths
from octomed_data.recipe import Recipe


def rl_settings(recipe: Recipe) -> dict[str, Any]:
    """What of the recipe an RL arm's result also depends on: the ``rl:`` block and the reward's
    ``verify:`` settings (part of the arm's settings fingerprint; arms without RL leave them out)."""
    return {"rl": recipe.rl.model_dump(mode="json"), "verify": recipe.verify.model_dump(mode="json")}


def rl_launcher(recipe: Recipe) -> tuple[str, int]:
    """This process for one device (the CPU smoke, one GPU); the recipe's launcher (``auto`` =
    torchrun) with one process per GPU when there are several."""
    from training.launch import default_processes

    processes = default_processes()
    if processes == 1:
        return "inprocess", 1
    launcher = recipe.training.launcher
    return (launcher if launcher in ("torchrun", "deepspeed") else "auto"), processes


def rl_arm(
    spec: ExperimentSpec,
    recipe: Recipe,
    exp: ExperimentPaths,
    base: RunPaths,
    arm: str,
    sft_checkpoint: str,
    force: bool,
) -> dict[str, Any]:
    """The base run's RL prompts, then GRPO from ``sft_checkpoint`` into the arm's ``rl/`` folder,
    exactly once per (SFT checkpoint, RL data, settings); returns what the arm's record keeps."""
    from training.rl_stage import RLStage, rl_job
    from training.run_checkpoints import remove_final_marker

    paths, folder = exp.arm(arm), RLFolder(exp.arm(arm).rl)
    data = rl_data_task(base, recipe)
    job = rl_job(
        recipe,
        base,
        sft_checkpoint=sft_checkpoint,
        work_dir=local_dir(paths, "rl-work"),
        overrides=spec.arm(arm).rl_trainer,
    )
    job = job.model_copy(  # the prompts are the base run's; what GRPO writes is the arm's
        update={
            "output_uri": folder.checkpoints,
            "metrics_uri": folder.metrics,
            "plot_uri": folder.plot,
            "judge_journal": folder.judge if job.judge else None,
        }
    )
    launcher, processes = rl_launcher(recipe)

    def train() -> dict[str, Any]:
        if force:  # --force: train again from step 0 (a finished job of these settings trains nothing)
            remove_final_marker(job.output_uri)
        return grpo_task(job, launcher, processes)

    stage = RLStage(paths, job, train, rerun=force)
    print(f"arm {arm}: GRPO from the SFT checkpoint {sft_checkpoint} on the RL prompts {data}")
    counts = run_global(stage).counts
    return {
        "sft_checkpoint": sft_checkpoint,
        "checkpoint": folder.checkpoints,
        "config_hash": stage.config_hash,
        "key": stage.key,
        "data": data,
        "data_fingerprint": job.inputs.get("rl_data"),
        "trainer": job.trainer,
        "launcher": launcher,
        "job": counts,
        "metrics_uri": folder.metrics,
        "plot_uri": folder.plot,
    }
