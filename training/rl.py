"""GRPO after SFT (issue 27): TRL's ``GRPOTrainer`` on the run's RL prompts, the factory's
verifier as the reward (:func:`octomed_data.rl.reward.reward_functions`), the SFT checkpoint as
the policy.

One job (:class:`RLJob`) trains exactly once: a finished job of the same settings on the same
data and SFT checkpoint (``checkpoint.json`` at ``output_uri`` with its ``config_hash``) trains
nothing; an interrupted one resumes from its newest uploaded intermediate checkpoint of the same
settings (``file://`` or ``s3://``, uploaded as SFT's are, marker last). Every logged step's
rewards, completion lengths and pass rate (the mean correctness reward of its rollouts) go to
TensorBoard and to ``metrics_uri`` (JSON lines); ``plot_uri`` gets reward and response length over
steps. DeepSpeed ZeRO as in SFT when ``zero_stage > 0``; vLLM generation (colocated) only where a
GPU is present and ``use_vllm`` asks for it, else the model's own ``generate``.

A vision-language policy (Qwen2(.5)-VL) trains on the image prompts too, through TRL's VLM path
(:mod:`training.rl_vision`: the processor, the images from the run's image store at ``max_pixels``,
the placeholders); a text-only policy leaves them out, counted (``skipped["image_prompt"]``).

``python -m training.rl --config JOB.json --result-file OUT.json`` is the process a launcher
starts (:func:`training.rl_stage.launch_rl`); ``train_grpo`` runs it in the calling process.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from octomed_data import storage
from octomed_data.errors import ConfigError, OctomedError
from octomed_data.layout import CheckpointFolder

log = logging.getLogger(__name__)

# The per-step metrics kept in ``metrics.jsonl`` (TRL's log keys -> ours).
METRIC_KEYS = {
    "reward": "reward",
    "reward_std": "reward_std",
    "rewards/correctness/mean": "pass_rate",
    "rewards/format/mean": "format_reward",
    "completions/mean_length": "completion_length_mean",
    "completions/max_length": "completion_length_max",
    "completions/clipped_ratio": "clipped_ratio",
    "frac_reward_zero_std": "frac_reward_zero_std",
    "kl": "kl",
    "loss": "loss",
    "entropy": "entropy",
}


# How image prompts reach the policy (part of every job's settings): 1 = a vision-language policy
# trains on them (training.rl_vision), a text-only one leaves them out, counted.
IMAGE_PROMPTS = 1

# The policy's processor files the final checkpoint keeps (the tokenizer is saved by itself).
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")


class RLJob(BaseModel):
    """One GRPO job: where the policy, prompts and outputs are, and its settings."""

    model_config = ConfigDict(extra="forbid")

    model_uri: str = Field(description="The SFT checkpoint (folder, file:// or s3:// with checkpoint.json).")
    data_uri: str = Field(description="The RL prompts (RLFolder.split('train')).")
    output_uri: str = Field(description="The GRPO checkpoints (RLFolder.checkpoints).")
    metrics_uri: str
    plot_uri: str
    work_dir: str
    trainer: dict[str, Any] = Field(default_factory=dict, description="GRPOSettings, dumped.")
    verify: dict[str, Any] | None = None
    format_weight: float = 0.0
    inputs: dict[str, Any] = Field(
        default_factory=dict, description="What the job trains from: SFT marker + data commit."
    )
    judge: dict[str, Any] | None = Field(
        None, description="The LLM judge teacher (TeacherConfig; its key comes from its env variable)."
    )
    judge_journal: str | None = Field(None, description="The reward judge's journal (RLFolder.judge).")
    max_pixels: int = Field(
        262144,
        ge=784,
        description="Image prompts' images are downscaled to at most this many pixels (as SFT).",
    )

    def t(self, name: str, default: Any = None) -> Any:
        return self.trainer.get(name, default)

    def settings(self) -> dict[str, Any]:
        """What makes two jobs the same: settings, reward and inputs (not where files go)."""
        return {
            "trainer": self.trainer,
            "verify": self.verify,
            "format_weight": self.format_weight,
            "inputs": self.inputs,
            # The judge's model and sampling decide rewards; where it is served does not.
            "judge": {k: v for k, v in (self.judge or {}).items() if k != "base_url"} or None,
            # A vision-language policy trains on the image prompts (IMAGE_PROMPTS), seen at this size.
            "images": {"handling": IMAGE_PROMPTS, "max_pixels": self.max_pixels},
        }

    def config_hash(self) -> str:
        raw = json.dumps(self.settings(), sort_keys=True, default=str)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


class RLFailed(OctomedError):
    """The GRPO job failed."""


def finished(job: RLJob) -> dict[str, Any] | None:
    """The result of a finished job of these settings at ``output_uri`` (nothing to train), if any."""
    marker_uri = CheckpointFolder(job.output_uri).marker
    if not storage.exists(marker_uri):
        return None
    marker = storage.read_json(marker_uri)
    if marker.get("config_hash") != job.config_hash():
        return None
    return {
        "checkpoint_uri": job.output_uri,
        "steps": int(marker.get("step") or 0),
        "final_loss": marker.get("loss"),
        "config_hash": marker.get("config_hash"),
        "metrics_uri": job.metrics_uri,
        "plot_uri": job.plot_uri,
        "trained_already": True,
    }


def job_rewards(job: RLJob) -> list[Any]:
    """The job's reward functions: the filter's verdict (the recipe's ``verify:`` settings, the LLM
    judge through the one inference client when they name one, journalled in ``judge_journal``),
    plus the format reward when weighted."""
    from octomed_data.rl.reward import reward_functions
    from octomed_data.teachers import TeacherConfig, resolve_api_key
    from octomed_data.verify import VerifySettings
    from octomed_data.verify.judge import JudgeEndpoint

    verify = VerifySettings.model_validate(job.verify) if job.verify else None
    endpoint = None
    if job.judge:
        teacher = TeacherConfig.model_validate(job.judge)
        if not job.judge_journal:
            raise ConfigError("rl: a judge needs a journal folder (judge_journal)")
        attempts = verify.max_attempts if verify else 6
        endpoint = JudgeEndpoint(teacher, resolve_api_key(teacher), job.judge_journal, max_attempts=attempts)
    return reward_functions(verify, job.format_weight, judge=endpoint)


def load_prompts(job: RLJob, tokenizer: Any, image_processor: Any = None) -> tuple[Any, dict[str, int]]:
    """The RL prompts as a ``datasets.Dataset`` (the reward functions get every other column) and
    what was left out, counted by reason: prompts longer than ``max_prompt_length`` tokens (an
    image prompt counted with its images expanded), and every image prompt when the policy is
    text-only (no ``image_processor``), or, for a vision-language policy, one whose image cannot be
    read. For a vision-language policy the image prompts stay in: the dataset loads their images
    from the run's image store when a batch asks for them (:class:`training.rl_vision.ImagePrompts`)."""
    from datasets import Dataset

    from octomed_data.schema import RecordError
    from training.rl_vision import ImagePrompts, image_prompt_tokens, prompt_tokens

    rows, skipped = [], {"prompt_too_long": 0, "image_prompt": 0}
    limit = int(job.t("max_prompt_length", 1024))
    for row in storage.Dataset(job.data_uri).iter_rows():
        uris = list(row.get("images") or [])
        if uris and image_processor is None:
            skipped["image_prompt"] += 1
            continue
        try:
            if uris:
                n = image_prompt_tokens(tokenizer, row["prompt"], uris, image_processor, job.max_pixels)
            else:
                n = prompt_tokens(tokenizer, row["prompt"])
        except RecordError as exc:  # an image missing from the store, or unreadable
            skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
            log.warning("RL prompt %s left out: %s", row.get("question_id"), exc)
            continue
        if n > limit:
            skipped["prompt_too_long"] += 1
            continue
        rows.append(row | {"images": uris})
    if not rows:
        raise ConfigError(
            f"no RL prompt to train on at {job.data_uri} (left out: {skipped}); build the RL data first"
        )
    if image_processor is None:
        return Dataset.from_list([{k: v for k, v in r.items() if k != "images"} for r in rows]), skipped
    return Dataset.from_list(rows).with_transform(ImagePrompts(job.max_pixels)), skipped


def grpo_config(job: RLJob, work_dir: Path, *, cuda: bool, progress: bool) -> Any:
    from trl import GRPOConfig

    zero = int(job.t("zero_stage", 0))
    ds = None
    if zero > 0:
        from training.deepspeed_config import deepspeed_config, skip_inference_kernels

        ds = deepspeed_config(SimpleNamespace(zero_stage=zero, offload_optimizer=False))
        skip_inference_kernels()
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(work_dir / "tensorboard")  # transformers 5: env only
    return GRPOConfig(
        output_dir=str(work_dir / "trainer"),
        max_steps=int(job.t("max_steps", 2)),
        num_generations=int(job.t("num_generations", 4)),
        per_device_train_batch_size=int(job.t("per_device_train_batch_size", 4)),
        max_completion_length=int(job.t("max_completion_length", 64)),
        learning_rate=float(job.t("learning_rate", 1e-6)),
        beta=float(job.t("beta", 0.04)),
        temperature=float(job.t("temperature", 1.0)),
        logging_steps=int(job.t("logging_steps", 1)),
        save_strategy="steps" if job.t("save_steps", 1) else "no",
        save_steps=int(job.t("save_steps", 1) or 500),
        seed=int(job.t("seed", 0)),
        report_to=["tensorboard"],
        use_cpu=not cuda,
        bf16=cuda,
        use_vllm=bool(job.t("use_vllm", False)) and cuda,
        vllm_mode="colocate",
        deepspeed=ds,
        disable_tqdm=not progress,
    )


def metrics_callback(job: RLJob, kept: list[dict[str, Any]]):
    from transformers import TrainerCallback

    class RecordMetrics(TrainerCallback):
        """Each logged step's rewards, lengths and pass rate, appended to ``metrics_uri`` (rank 0)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "reward" not in logs:
                return
            row = {"step": state.global_step} | {
                ours: float(logs[theirs]) for theirs, ours in METRIC_KEYS.items() if theirs in logs
            }
            kept.append(row)
            storage.write_bytes(job.metrics_uri, "".join(json.dumps(r) + "\n" for r in kept).encode())

    return RecordMetrics()


def read_metrics(uri: str, up_to: int) -> list[dict[str, Any]]:
    """The metrics an interrupted job logged up to the checkpoint it resumes from."""
    if not storage.exists(uri):
        return []
    lines = storage.read_bytes(uri).decode("utf-8").splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if int(r["step"]) <= up_to]


def plot_metrics(rows: list[dict[str, Any]], plot_uri: str) -> None:
    """Reward and response length over steps (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot(steps, [r.get("reward") for r in rows], marker="o", label="reward")
    ax1.plot(steps, [r.get("pass_rate") for r in rows], marker="x", label="pass rate")
    ax1.set_xlabel("step")
    ax1.set_title("reward")
    ax1.legend()
    ax2.plot(steps, [r.get("completion_length_mean") for r in rows], marker="o", color="tab:green")
    ax2.set_xlabel("step")
    ax2.set_title("response length (tokens)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    storage.write_bytes(plot_uri, buf.getvalue())


def train_grpo(job: RLJob, *, progress: bool = False) -> dict[str, Any]:
    """Run the job in this process (one of a launcher's processes, or alone); returns its result."""
    done = finished(job)
    if done is not None:
        log.info("%s is trained already with these settings: nothing trained", job.output_uri)
        return done
    import torch
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    from training.checkpoints import download_folder, intermediate_checkpoints
    from training.models import is_vision_model, resolve_model
    from training.rl_vision import vl_processor
    from training.run_checkpoints import remove_final_marker, save_final
    from training.trainer_parts import upload_callback

    work = Path(job.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    policy = resolve_model(job.model_uri, work / "policy")
    tokenizer = AutoTokenizer.from_pretrained(str(policy))
    # A vision-language policy gets TRL's VLM path: a processor, and the image prompts' images.
    processor = vl_processor(policy, tokenizer) if is_vision_model(policy) else None
    image_processor = processor.image_processor if processor is not None else None
    dataset, skipped = load_prompts(job, tokenizer, image_processor)
    image_prompts = (
        sum(1 for uris in dataset.data.column("images").to_pylist() if uris) if processor is not None else 0
    )
    if skipped["image_prompt"]:
        log.warning("%d image prompt(s) left out: the policy is text-only", skipped["image_prompt"])
    if image_prompts:
        log.info(
            "%d of %d prompts carry images: the vision-language policy sees them", image_prompts, len(dataset)
        )
    args = grpo_config(job, work, cuda=cuda, progress=progress)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        shutil.rmtree(work / "trainer", ignore_errors=True)  # a resume comes from the store
    rewards = job_rewards(job)
    config_hash = job.config_hash()
    meta = {"config_hash": config_hash, "settings": job.settings(), "kind": "grpo"}
    ours = [c for c in intermediate_checkpoints(job.output_uri, config_hash)]
    resume_from, kept = None, []
    if ours:
        step, uri, marker = ours[-1]
        resume_from = work / "resume" / f"checkpoint-{step}"
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            shutil.rmtree(resume_from, ignore_errors=True)
            download_folder(uri, marker["files"], resume_from)
        kept = read_metrics(job.metrics_uri, step)
        log.info("resuming from %s (step %s)", uri, step)
    remove_final_marker(job.output_uri)
    trainer = GRPOTrainer(
        model=str(policy),
        reward_funcs=rewards,
        args=args,
        train_dataset=dataset,
        processing_class=processor if processor is not None else tokenizer,
        callbacks=[upload_callback(job.output_uri, meta), metrics_callback(job, kept)],
    )
    t0 = time.time()
    out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.time() - t0
    steps = int(trainer.state.global_step)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {
        "checkpoint_uri": job.output_uri,
        "steps": steps,
        "final_loss": float(losses[-1]) if losses else None,
        "train_loss": float(out.training_loss) if out.training_loss is not None else None,
        "prompts": len(dataset),
        "image_prompts": image_prompts,
        "image_prompts_left_out": skipped["image_prompt"],  # a text-only policy cannot see them
        "skipped": skipped,
        "resumed_from_step": int(ours[-1][0]) if ours else 0,
        "seconds": round(seconds, 3),
        "config_hash": config_hash,
        "metrics_uri": job.metrics_uri,
        "plot_uri": job.plot_uri,
        "last_metrics": kept[-1] if kept else {},
        "trained_already": False,
    }
    final_dir = work / "final"
    trainer.save_model(str(final_dir))  # every rank (ZeRO-3 gathers the weights)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(str(final_dir))
        for name in PROCESSOR_FILES:  # a VL policy stays evaluable as one (its image processor)
            if (policy / name).is_file() and not (final_dir / name).exists():
                shutil.copy2(policy / name, final_dir / name)
        plot_metrics(kept, job.plot_uri) if kept else None
        finished_as = SimpleNamespace(
            steps=steps,
            final_loss=result["final_loss"],
            mean_loss=result["train_loss"],
            samples_seen=steps * args.per_device_train_batch_size,
            examples_per_step=args.per_device_train_batch_size,
            skipped=skipped,
            truncated=0,
        )
        save_final(
            SimpleNamespace(output_uri=job.output_uri),
            finished_as,
            loaded=None,
            final_dir=final_dir,
            ds_config=args.deepspeed if isinstance(args.deepspeed, dict) else None,
            meta=meta,
        )
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m training.rl --config JOB.json [--result-file OUT.json] [--no-progress]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        config = Path(args[args.index("--config") + 1])
        result_file = args[args.index("--result-file") + 1] if "--result-file" in args else None
    except (ValueError, IndexError):
        print("error: usage: python -m training.rl --config JOB.json [--result-file OUT.json]")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        job = RLJob.model_validate_json(config.read_text())
        result = train_grpo(job, progress="--no-progress" not in args)
    except OctomedError as exc:
        print(f"error: {exc}")
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        if result_file:
            Path(result_file).write_text(json.dumps(result))
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
