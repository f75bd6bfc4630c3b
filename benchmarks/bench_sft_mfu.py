"""SFT throughput and MFU of the Qwen2.5-VL-7B architecture at real shapes (random weights).

    # on a GPU machine (bf16, DeepSpeed ZeRO from training.deepspeed_config's config builder):
    python benchmarks/bench_sft_mfu.py --preset 7b --seq-len 16384 --steps 8 --warmup 3
    # CPU check of the same code path with a scaled-down architecture (no MFU claim):
    python benchmarks/bench_sft_mfu.py --preset small --device cpu --seq-len 2048 --steps 3 --warmup 1

What one step is: a packed micro-batch of ``--seq-len`` tokens holding several examples whose lengths
follow a reasoning-trace-like distribution, collated by the trainer's own ``PackedCollator`` (position
ids reset per example, no attention mask, so attention is block-diagonal; varlen flash-attention
when flash_attn is installed), loss on the assistant share of each
example, forward + backward + optimizer step through a DeepSpeed engine built from
:func:`training.deepspeed_config.deepspeed_config` (ZeRO stage from ``--zero``). Tokens/s counts real tokens.

MFU = model FLOPs per second / peak: model FLOPs per token are 6·N (N = parameters of the language
model that do matmuls per token, lm_head included, embeddings excluded) plus causal attention
6·2·L·d·c (c = mean attention context: half each example's length). Activation recomputation
(gradient checkpointing) is not counted (that would be HFU). The peak is ``--peak-tflops``
(default 989 = H100/H200 SXM dense bf16 spec).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Qwen2.5-VL-7B-Instruct's text and vision configuration (config.json of the released model).
QWEN25_VL_7B = {
    "text": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=128000,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        tie_word_embeddings=False,
    ),
    "vision": dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    ),
}
# Same shape family, small enough for a CPU to run the code path.
SMALL = {
    "text": dict(QWEN25_VL_7B["text"], hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=32000,
                 rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}),
    "vision": dict(QWEN25_VL_7B["vision"], depth=2, hidden_size=128, intermediate_size=256, num_heads=4,
                   out_hidden_size=256, fullatt_block_indexes=[1]),
}  # fmt: skip


def build_model(preset: str, dtype, device: str):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    shapes = QWEN25_VL_7B if preset == "7b" else SMALL
    config = Qwen2_5_VLConfig(
        text_config=shapes["text"],
        vision_config=shapes["vision"],
        image_token_id=151655,
        video_token_id=151656,
    )
    config._attn_implementation = "flash_attention_2" if _has_flash_attn() and device == "cuda" else "sdpa"
    import torch

    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    return model, config


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401

        return True
    except ImportError:
        return False


def example_lengths(rng, seq_len: int) -> list[int]:
    """Example lengths filling one packed row: prompt ~ 250 tokens + trace ~ lognormal(median 900)."""
    lengths, total = [], 0
    while True:
        n = int(min(seq_len, 250 + rng.lognormvariate(6.8, 0.7)))
        if total + n > seq_len:
            break
        lengths.append(n)
        total += n
    return lengths or [seq_len]


def packed_batch(rng, seq_len: int, vocab: int, device: str, flatten: bool):
    """One packed row through the trainer's own collator (training.packing.PackedCollator)."""
    from training.packing import PackedCollator

    lengths = example_lengths(rng, seq_len)
    examples = []
    for n in lengths:
        ids = [rng.randrange(0, min(vocab, 150000)) for _ in range(n)]
        prompt = max(1, n // 4)  # the prompt share is not learned
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "images": []})
    collate = PackedCollator(pad_token_id=0, max_seq_len=seq_len, mrope=True, flatten=flatten)
    batch = collate([{"examples": examples}])
    batch.pop("num_examples")
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}, lengths


def flops_per_step(config, lengths: list[int]) -> float:
    text = config.text_config
    d, layers, v = text.hidden_size, text.num_hidden_layers, text.vocab_size
    kv = d // text.num_attention_heads * text.num_key_value_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * text.intermediate_size  # q,o + k,v + gated MLP
    n_matmul = layers * per_layer + d * v  # + lm_head
    tokens = sum(lengths)
    attn = sum(6 * 2 * layers * d * (n / 2) * n for n in lengths)  # causal QK^T and AV, fwd+bwd
    return 6 * n_matmul * tokens + attn


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=["7b", "small"], default="7b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=2)
    ap.add_argument("--no-grad-ckpt", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import random

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "error: --device cuda but no CUDA GPU is visible; use --device cpu --preset small",
            file=sys.stderr,
        )
        return 2
    from octomed_data.job_config import TrainConfig
    from training.deepspeed_config import deepspeed_config
    from training.distributed import ensure_distributed_env

    ensure_distributed_env()
    import deepspeed

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model, config = build_model(args.preset, dtype, args.device)
    if not args.no_grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(
        train_data=["-"], model_path="-", output_uri="-", zero_stage=args.zero, global_batch_size=1
    )
    ds = deepspeed_config(cfg)
    ds.update(train_batch_size=1, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1,
              gradient_clipping=1.0, bf16={"enabled": dtype == torch.bfloat16}, fp16={"enabled": False})  # fmt: skip
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if ds["zero_optimization"].get(key) == "auto":
            ds["zero_optimization"][key] = (
                int(5e8) if key != "stage3_param_persistence_threshold" else int(1e5)
            )
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=args.device == "cuda")
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)

    rng = random.Random(args.seed)
    times, tokens, flops = [], [], []
    for step in range(args.warmup + args.steps):
        batch, lengths = packed_batch(
            rng,
            args.seq_len,
            config.text_config.vocab_size,
            args.device,
            config._attn_implementation != "sdpa",
        )
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(dt)
            tokens.append(sum(lengths))
            flops.append(flops_per_step(config, lengths))
    tps = [t / s for t, s in zip(tokens, times, strict=True)]
    achieved = [f / s for f, s in zip(flops, times, strict=True)]
    out = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "params": n_params,
        "seq_len": args.seq_len,
        "zero_stage": args.zero,
        "grad_ckpt": not args.no_grad_ckpt,
        "attn": config._attn_implementation,
        "steps": args.steps,
        "step_s_median": round(statistics.median(times), 4),
        "tokens_per_s_median": round(statistics.median(tps), 1),
        "model_tflops_median": round(statistics.median(achieved) / 1e12, 2),
        "mfu_median": round(statistics.median(achieved) / (args.peak_tflops * 1e12), 4),
        "peak_tflops": args.peak_tflops,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)
        if args.device == "cuda"
        else None,
        "loss_last": float(loss.detach()),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
