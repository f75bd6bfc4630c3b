"""The DeepSpeed JSON config SFT runs with, generated from :class:`~octomed_data.job_config.TrainConfig`.

"auto" values are filled by the HF ``Trainer`` from its own arguments (the same numbers), so the
two can't disagree.
"""

from __future__ import annotations

from typing import Any

from octomed_data.job_config import TrainConfig


def deepspeed_config(config: TrainConfig) -> dict[str, Any]:
    """DeepSpeed JSON config for ``config``. "auto" values are filled by ``Trainer`` from its args."""
    zero: dict[str, Any] = {
        "stage": config.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": True,
        "reduce_bucket_size": "auto",
    }
    if config.zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                "stage3_max_live_parameters": 1e9,
                "stage3_max_reuse_distance": 1e9,
                "sub_group_size": 1e9,
                # Save a full (unsharded) model.safetensors, loadable without DeepSpeed.
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    if config.zero_stage == 2:
        zero["allgather_bucket_size"] = 5e8
    ds: dict[str, Any] = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "steps_per_print": 10**9,  # Trainer logs; DeepSpeed's own prints only add noise
        "wall_clock_breakdown": False,
    }
    if config.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        # CPU offload needs DeepSpeed's own (CPU-Adam) optimizer.
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    return ds


def skip_inference_kernels() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce kernel in this process.

    DeepSpeed's process-group start builds ``deepspeed_shm_comm`` (C++, ~50 s of CPU on the first use
    in each venv, again whenever the venv's path changes) although only its ``inference_all_reduce``
    calls it; training's all-reduces are ``torch.distributed``'s. Marked incompatible, the kernel is
    never built and DeepSpeed falls back to the process group, as it does on machines without it.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
