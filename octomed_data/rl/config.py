"""The recipe's ``rl:`` block: which prompts reinforcement learning after SFT trains on (the pass-rate
band, per-source weights, the held-out split), its rewards, and the GRPO job's settings.

The data half (:mod:`octomed_data.rl.data`) reads everything but ``trainer``; the trainer
(``training/rl.py``) reads ``trainer``."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class GRPOSettings(BaseModel):
    """The GRPO job's settings (TRL's ``GRPOConfig`` names, the CPU smoke's defaults)."""

    model_config = ConfigDict(extra="forbid")

    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (the GRPO group).")
    max_steps: int = Field(2, ge=1)
    learning_rate: float = Field(1e-6, gt=0)
    beta: float = Field(0.04, ge=0, description="KL coefficient against the SFT (reference) model.")
    max_prompt_length: int = Field(
        1024, ge=1
    )  # a MedQA stem + options, or an image (334 tokens at 262,144 px) + text
    max_completion_length: int = Field(64, ge=1)
    per_device_train_batch_size: int = Field(4, ge=1)
    temperature: float = Field(1.0, gt=0)
    save_steps: int = Field(1, ge=1)
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage as in SFT; 0: no DeepSpeed.")
    use_vllm: bool = Field(False, description="Generate rollouts with vLLM (a GPU).")
    logging_steps: int = Field(1, ge=1)
    seed: int = 0


class RLOptions(BaseModel):
    """Reinforcement learning after SFT: the data it trains on, its rewards and the GRPO job."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Automation runs RL after a finished SFT checkpoint.")
    pass_rate_min: float = Field(
        0.0, ge=0, le=1, description="Lower end of the pass-rate band (accepted / judged teacher samples)."
    )
    pass_rate_max: float = Field(1.0, ge=0, le=1, description="Upper end of the pass-rate band.")
    inclusive: bool = Field(
        False,
        description="False (default): both ends excluded, so questions every sample solved or none did "
        "(no learning signal for GRPO) are left out; True: both ends included.",
    )
    weights: dict[str, float] = Field(
        default_factory=dict,
        description="Per-source weight in [0, 1]: keeps that seeded fraction of the source's prompts "
        "(unlisted sources: 1). No weight above 1: GRPO samples every prompt num_generations times per "
        "step already, and repeating a prompt in the data adds nothing the step count does not.",
    )
    validation_fraction: float = Field(0.05, ge=0, lt=1, description="Share of questions held out.")
    seed: int = 0
    max_prompts: int | None = Field(
        None, ge=1, description="At most this many prompts (train + validation; a seeded choice)."
    )
    format_reward: float = Field(
        0.0, ge=0, description="Weight of the format reward (answer line present, thinking closed); 0: off."
    )
    trainer: GRPOSettings = Field(default_factory=GRPOSettings)

    @field_validator("weights")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in v.items() if not (math.isfinite(w) and 0 <= w <= 1)}
        if bad:
            raise ValueError(
                f"rl.weights must be fractions in [0, 1] (GRPO already samples each prompt many times): {bad}"
            )
        return v

    @model_validator(mode="after")
    def _band(self) -> RLOptions:
        if self.pass_rate_min > self.pass_rate_max or (
            not self.inclusive and self.pass_rate_min >= self.pass_rate_max
        ):
            raise ValueError(
                f"rl pass-rate band ({self.pass_rate_min}, {self.pass_rate_max}) is empty"
                + ("" if self.inclusive else " (both ends are excluded unless inclusive: true)")
            )
        return self

    def weight(self, source: str) -> float:
        return self.weights.get(source, 1.0)

    def in_band(self, pass_rate: float) -> bool:
        """Is a question's pass rate inside the band (both ends excluded unless ``inclusive``)?"""
        if self.inclusive:
            return self.pass_rate_min <= pass_rate <= self.pass_rate_max
        return self.pass_rate_min < pass_rate < self.pass_rate_max

    def data_settings(self) -> dict[str, Any]:
        """What decides the RL data (the data step's fingerprint): everything but the trainer's settings,
        ``enabled`` and ``format_reward`` (they decide no prompt)."""
        return self.model_dump(mode="json", exclude={"trainer", "enabled", "format_reward"})
