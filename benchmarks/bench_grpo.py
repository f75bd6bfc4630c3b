"""GRPO throughput (steps/s, tokens/s) of the RL stage's trainer at a configurable model size.

    # CPU check on the tiny random model (what CI and the demo run):
    python benchmarks/bench_grpo.py --preset tiny --steps 6 --warmup 2
    # on a GPU (bf16; vLLM generation with --vllm where vLLM is installed): Qwen2.5-7B's text shape
    python benchmarks/bench_grpo.py --preset 7b --steps 8 --warmup 2 --completion-len 512 --generations 8
    # image prompts through a vision-language policy (Qwen2.5-VL; the 7b preset: Qwen2.5-VL-7B's shape)
    python benchmarks/bench_grpo.py --preset tiny --vision --steps 4 --warmup 1

What one step is: :class:`trl.GRPOTrainer` (the trainer ``training/rl.py`` runs) on MCQ prompts
in the RL data's columns, ``--batch`` completions per device per step (``--batch / --generations``
prompts), rewarded by the factory's verifier (:func:`octomed_data.rl.reward.reward_functions`):
generation, reward, reference log-probs and the policy update. The model has random weights (a
throughput number, not a quality one): completions mostly run to ``--completion-len``. tokens/s
counts prompt + completion tokens TRL reports (``num_tokens``) over the timed steps.

``--vision``: the policy is a Qwen2.5-VL of the preset's text shape and every prompt carries one
of the bundled OmniMedVQA sample images (224 x 224 PNG), given to TRL as the RL stage gives them
(:mod:`training.rl_vision`: the image-only Qwen2.5-VL processor, images loaded from their files
when a batch asks, the placeholder before the question); the vision tower then runs in
generation, in the log-prob passes and in the update.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Qwen2.5-7B-Instruct's text configuration (the language model of Qwen2.5-VL-7B).
QWEN25_7B = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    rope_theta=1000000.0,
)


# Qwen2.5-VL-7B's vision tower (its config.json's vision_config).
QWEN25_VL_7B_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)
SAMPLE_IMAGES = REPO / "octomed_data" / "sample_data" / "omnimedvqa" / "images"


def build_model(preset: str, out: Path, vision: bool = False) -> Path:
    """The tiny model of training/tiny.py, or a random model of the 7B shape with the tiny tokenizer."""
    from training.tiny import build_text_model, build_tokenizer, build_vl_model

    if preset == "tiny":
        return build_vl_model(out) if vision else build_text_model(out)
    if vision:
        return build_vl(preset, out)
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    shape = QWEN25_7B if preset == "7b" else dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)  # fmt: skip
    tokenizer = build_tokenizer(out)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=32768,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16",
        **shape,
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(str(out))
    return out


def build_vl(preset: str, out: Path) -> Path:
    """A random Qwen2.5-VL of the preset's text shape (7b: Qwen2.5-VL-7B's, vision tower included)."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from training.tiny import QWEN_SPECIAL_TOKENS, build_tokenizer

    tokenizer = build_tokenizer(out)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    if preset == "7b":
        text, vision = dict(QWEN25_7B), dict(QWEN25_VL_7B_VISION)
        rope = [16, 24, 24]  # head_dim 128
    else:
        text = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)  # fmt: skip
        vision = dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[3])  # fmt: skip
        rope = [8, 12, 12]  # head_dim 64
    theta = text.pop("rope_theta", 1000000.0)
    config = Qwen2_5_VLConfig(
        text_config=text
        | {
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 32768,
            "rope_scaling": {"type": "mrope", "mrope_section": rope},
            "rope_parameters": {"rope_type": "default", "mrope_section": rope, "rope_theta": theta},
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=vision | {"out_hidden_size": text["hidden_size"]},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16 if cuda else torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(str(out))
    Qwen2VLImageProcessorPil().save_pretrained(str(out))  # Qwen2.5-VL's defaults
    return out


def prompts(n: int, vision: bool = False) -> list[dict]:
    """MCQ prompts in the RL data's columns (system + user, gold letter, options); with ``vision``
    each carries one sample image (its file path, as the RL data carries image-store URIs)."""
    images = sorted(str(p) for p in SAMPLE_IMAGES.glob("*.png"))
    rows = []
    for i in range(n):
        rows.append(
            {
                "images": [images[i % len(images)]] if vision else [],
                "prompt": [
                    {
                        "role": "system",
                        "content": "Answer with the letter. End with: Final answer: \\boxed{X}",
                    },
                    {
                        "role": "user",
                        "content": f"Case {i}: chest pain radiating to the left arm. Which drug?\nA. aspirin\nB. heparin\nC. insulin\nD. warfarin",
                    },  # fmt: skip
                ],
                "question_id": f"q{i}",
                "source": "bench",
                "task_type": "text_mcq",
                "gold_answer": "A",
                "answer_text": "aspirin",
                "options": [
                    {"label": k, "text": t}
                    for k, t in zip("ABCD", ("aspirin", "heparin", "insulin", "warfarin"), strict=True)
                ],
            }
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=["tiny", "small", "7b"], default="tiny")
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    ap.add_argument("--batch", type=int, default=4, help="completions per device per step")
    ap.add_argument("--generations", type=int, default=2, help="completions per prompt (the GRPO group)")
    ap.add_argument("--completion-len", type=int, default=32)
    ap.add_argument("--vllm", action="store_true", help="vLLM colocated generation (GPU)")
    ap.add_argument("--zero", type=int, default=0, help="DeepSpeed ZeRO stage (0: none)")
    ap.add_argument("--vision", action="store_true", help="a Qwen2.5-VL policy on image prompts")
    ap.add_argument("--max-pixels", type=int, default=262144, help="image cap before patching (as SFT)")
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from octomed_data.rl.reward import reward_functions

    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    model_dir = build_model(args.preset, work / "model", args.vision)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(work / "tb")
    ds_config = None
    if args.zero:
        from types import SimpleNamespace

        from training.deepspeed_config import deepspeed_config

        ds_config = deepspeed_config(SimpleNamespace(zero_stage=args.zero, offload_optimizer=False))
    total = args.warmup + args.steps
    config = GRPOConfig(
        output_dir=str(work / "out"),
        max_steps=total,
        num_generations=args.generations,
        per_device_train_batch_size=args.batch,
        max_completion_length=args.completion_len,
        learning_rate=1e-6,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not cuda,
        bf16=cuda,
        use_vllm=args.vllm and cuda,
        vllm_mode="colocate",
        deepspeed=ds_config,
        disable_tqdm=True,
    )
    marks: dict[int, tuple[float, float]] = {}

    class Clock(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs:
                marks[state.global_step] = (time.perf_counter(), float(logs["num_tokens"]))

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    dataset = Dataset.from_list(prompts(max(8, total * args.batch), args.vision))
    processing = tokenizer
    if args.vision:
        from training.rl_vision import ImagePrompts, vl_processor

        processing = vl_processor(model_dir, tokenizer)
        dataset = dataset.with_transform(ImagePrompts(args.max_pixels))
    else:
        dataset = dataset.remove_columns("images")
    trainer = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=reward_functions(),
        args=config,
        train_dataset=dataset,
        processing_class=processing,
        callbacks=[Clock()],
    )
    trainer.train()
    (t0, n0), (t1, n1) = marks[args.warmup], marks[total]
    seconds = t1 - t0
    params = sum(p.numel() for p in trainer.model.parameters())
    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "params": params,
        "timed_steps": args.steps,
        "steps_per_s": round(args.steps / seconds, 4),
        "tokens_per_s": round((n1 - n0) / seconds, 1),
        "completions_per_step": args.batch,
        "generations": args.generations,
        "completion_len": args.completion_len,
        "vllm": bool(args.vllm and cuda),
        "zero": args.zero,
        "vision": args.vision,
        "images_per_s": round(args.steps * args.batch / seconds, 2) if args.vision else None,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
