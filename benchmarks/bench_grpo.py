"""GRPO throughput (steps/s, tokens/s) of the RL stage's trainer at a configurable model size.

    # CPU check on the tiny random model (what CI and the demo run):
    python benchmarks/bench_grpo.py --preset tiny --steps 6 --warmup 2
    # on a GPU (bf16; vLLM generation with --vllm where vLLM is installed): Qwen2.5-7B's text shape
    python benchmarks/bench_grpo.py --preset 7b --steps 8 --warmup 2 --completion-len 512 --generations 8

What one step is: :class:`trl.GRPOTrainer` (the trainer ``training/rl.py`` runs) on MCQ prompts
in the RL data's columns, ``--batch`` completions per device per step (``--batch / --generations``
prompts), rewarded by the factory's verifier (:func:`octomed_data.rl.reward.reward_functions`):
generation, reward, reference log-probs and the policy update. The model has random weights (a
throughput number, not a quality one): completions mostly run to ``--completion-len``. tokens/s
counts prompt + completion tokens TRL reports (``num_tokens``) over the timed steps.
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


def build_model(preset: str, out: Path) -> Path:
    """The tiny model of training/tiny.py, or a random model of the 7B shape with the tiny tokenizer."""
    from training.tiny import build_text_model, build_tokenizer

    if preset == "tiny":
        return build_text_model(out)
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


def prompts(n: int) -> list[dict]:
    """MCQ prompts in the RL data's columns (system + user, gold letter, options)."""
    rows = []
    for i in range(n):
        rows.append(
            {
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
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from octomed_data.rl.reward import reward_functions

    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    model_dir = build_model(args.preset, work / "model")
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

    trainer = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=reward_functions(),
        args=config,
        train_dataset=Dataset.from_list(prompts(max(8, total * args.batch))),
        processing_class=AutoTokenizer.from_pretrained(str(model_dir)),
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
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
