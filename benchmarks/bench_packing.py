"""Padding efficiency of sequence packing vs padding, and CPU training tokens/s packed vs padded.

    .venv/bin/python benchmarks/bench_packing.py                    # everything (~2 min on 2 cores)
    .venv/bin/python benchmarks/bench_packing.py --n 20000 --skip-train

Efficiency = fraction of the token slots a step computes on that hold a real (non-pad) token.

(a) The length distribution. Each example is a real held-out question (MedQA, MedMCQA, PubMedQA,
    MMLU medical, MedXpertQA text, VQA-RAD and OmniMedVQA with their real images) rendered with
    the factory's own prompts, plus a modelled teacher answer:
    * prompt tokens = characters / 4 (ASSUMED: Qwen2.5's BPE averages ~4 characters per token
      on English text; the Qwen tokenizer can't be downloaded here) + 20 tokens of chat markup;
    * image tokens = exactly what the collator produces (``training.packing.image_token_count``
      with Qwen2.5-VL's default processor and max_pixels 262,144) for each real image size;
    * answer tokens = ASSUMED log-normal: R1-style traces for text questions (median 1,000,
      sigma 0.75, ~5% above 3,500: long reasoning traces reported for DeepSeek-R1 on medical
      MCQs run into the thousands of tokens) and shorter GPT-4o-style chain-of-thought for image
      questions (median 350, sigma 0.6), as the OctoMed paper finds reasoning length is task
      dependent. Replace with real trace lengths once a distillation run has produced some.
(b) Strategies at several ``max_seq_len`` (examples longer are truncated, as in training):
    padded random micro-batches of b examples, padded to the longest; length-grouped padding
    (HF ``group_by_length``: mega-batches of 50*b sorted by length), the stronger baseline;
    packing (``training.packing.pack_examples``, best-fit-decreasing over windows), whose
    efficiency counts every pack as a full ``max_seq_len`` row.
(c) CPU tokens/s of forward+backward+AdamW on a small Qwen2 (hidden 256, 4 layers, random
    weights), lengths of (a) scaled by 1/16 into rows of 1,024: padded micro-batches of 8 vs
    packed rows (batch 1), real tokens per second, median of ``--repeats`` interleaved runs of 4 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from training.packing import image_token_count, pack_examples  # noqa: E402

DATA = Path(os.environ.get("OCTOMED_SHARED_DATA", REPO.parent / "shared" / "data"))
CHARS_PER_TOKEN = 4.0  # assumption, see the module docstring
CHAT_MARKUP_TOKENS = 20
MAX_PIXELS = 262144

SOURCES = [  # (format, file, images)
    ("medqa", "medqa/phrases_no_exclude_test.jsonl", None),
    ("medmcqa", "medmcqa/dev.json", None),
    ("pubmedqa", "pubmedqa/ori_pqal.json", None),
    ("mmlu", "mmlu_medical", None),
    ("medxpertqa", "medxpertqa/medxpertqa_text.jsonl", None),
    ("vqa_rad", "vqa_rad/testset.json", "vqa_rad/images"),
    ("omnimedvqa", "omnimedvqa/MRI_CT_XRAY_300each_dataset.json", "omnimedvqa"),
]


def real_prompts(work: Path) -> tuple[np.ndarray, np.ndarray]:
    """(prompt tokens, has_image) per real question, images counted as the collator expands them."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from octomed_data import storage
    from octomed_data.prompts import render_question, system_prompt
    from octomed_data.stages.ingest import ingest

    processor = Qwen2VLImageProcessorPil()  # Qwen2.5-VL's defaults: 3,136..12,845,056 pixels, 14px, merge 2
    out = work / "questions"
    for fmt, rel, images in SOURCES:
        ingest(
            fmt,
            str(DATA / rel),
            str(out),
            images=str(DATA / images) if images else None,
            shard_prefix=fmt.replace("_", "-"),
        )
    tokens, with_image = [], []
    for row in storage.Dataset(str(out / "questions")).read_all().to_pylist():
        text = system_prompt(row["task_type"]) + render_question(row)
        n = round(len(text) / CHARS_PER_TOKEN) + CHAT_MARKUP_TOKENS
        images = row.get("images") or []
        n += sum(image_token_count(im["width"], im["height"], processor, MAX_PIXELS) for im in images)
        tokens.append(n)
        with_image.append(bool(images))
    return np.asarray(tokens), np.asarray(with_image)


def sample_lengths(n: int, prompts: np.ndarray, with_image: np.ndarray, seed: int) -> np.ndarray:
    """``n`` example lengths: a real prompt (images as half the examples) + a modelled answer."""
    rng = np.random.default_rng(seed)
    text_idx, image_idx = np.flatnonzero(~with_image), np.flatnonzero(with_image)
    is_image = rng.random(n) < 0.5 if len(image_idx) else np.zeros(n, dtype=bool)
    pick = np.where(is_image, rng.choice(image_idx, n), rng.choice(text_idx, n))
    answer = np.where(
        is_image, rng.lognormal(np.log(350), 0.6, n), rng.lognormal(np.log(1000), 0.75, n)
    ).astype(int)
    return prompts[pick] + np.maximum(answer, 8)


def padded_efficiency(lengths: np.ndarray, batch: int, seed: int, grouped: bool) -> float:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    if grouped:  # transformers' LengthGroupedSampler: sort inside mega-batches of 50 micro-batches
        mega = 50 * batch
        order = np.concatenate(
            [
                c[np.argsort(-lengths[c], kind="stable")]
                for c in np.array_split(order, range(mega, len(order), mega))
            ]
        )
    real = slots = 0
    for start in range(0, len(order), batch):
        chunk = lengths[order[start : start + batch]]
        real += int(chunk.sum())
        slots += len(chunk) * int(chunk.max())
    return real / slots


def efficiency_table(lengths_full: np.ndarray, seq_lens: list[int], seed: int) -> list[dict]:
    rows = []
    for seq in seq_lens:
        lengths = np.minimum(lengths_full, seq)
        row = {"max_seq_len": seq, "truncated_pct": round(100 * float((lengths_full > seq).mean()), 2)}
        for b in (4, 8):
            row[f"padded_random_b{b}"] = round(padded_efficiency(lengths, b, seed, grouped=False), 4)
            row[f"padded_grouped_b{b}"] = round(padded_efficiency(lengths, b, seed, grouped=True), 4)
        for window in (512, 4096):
            started = time.perf_counter()
            packing = pack_examples(lengths, seq, seed=seed, window=window)
            row[f"packed_w{window}"] = round(packing.fill, 4)
            row[f"packed_w{window}_examples_per_pack"] = round(packing.mean_examples_per_pack, 2)
            row[f"pack_w{window}_s"] = round(time.perf_counter() - started, 3)
        rows.append(row)
    return rows


def train_throughput(lengths_full: np.ndarray, repeats: int, seed: int) -> dict:
    """Real tokens/s of forward+backward+AdamW, packed rows vs padded micro-batches (CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    from training.packing import PackedCollator
    from training.tiny import build_text_model

    torch.set_num_threads(2)
    seq, steps, padded_batch = 1024, 4, 8
    lengths = np.clip(lengths_full // 16, 8, seq)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_text_model(Path(tmp) / "m", hidden_size=256, num_layers=4)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size

    def example(n: int) -> dict:
        ids = rng.integers(10, vocab, n).tolist()
        return {"input_ids": ids, "labels": ids, "images": []}

    packing = pack_examples(lengths, seq, seed=seed, window=4096)
    collate = PackedCollator(pad_token_id=0, max_seq_len=seq)

    def packed_batches():
        for i in range(len(packing)):
            batch = collate([{"examples": [example(int(lengths[j])) for j in packing.pack(i)]}])
            batch.pop("num_examples")
            yield batch, int(packing.tokens[i])

    def padded_batches():
        order = rng.permutation(len(lengths))
        for s in range(0, len(order), padded_batch):
            chunk = [int(lengths[j]) for j in order[s : s + padded_batch]]
            width = max(chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, n in enumerate(chunk):
                ids[r, :n] = torch.tensor(example(n)["input_ids"])
                mask[r, :n] = 1
            labels = ids.masked_fill(mask == 0, -100)
            yield {"input_ids": ids, "attention_mask": mask, "labels": labels}, sum(chunk)

    def run(batches) -> float:
        real, elapsed = 0, 0.0
        for _ in range(steps):
            batch, tokens = next(batches)
            real += tokens
            started = time.perf_counter()
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
            elapsed += time.perf_counter() - started
        return real / elapsed

    packed_gen, padded_gen = packed_batches(), padded_batches()
    run(packed_gen), run(padded_gen)  # warm-up
    packed, padded = [], []
    for _ in range(repeats):  # interleaved, so load from other processes hits both alike
        packed.append(run(packed_gen))
        padded.append(run(padded_gen))
    return {
        "rows": f"packed: 1 x {seq}; padded: {padded_batch} x longest",
        "packed_tokens_per_s": round(statistics.median(packed)),
        "padded_tokens_per_s": round(statistics.median(padded)),
        "speedup": round(statistics.median(packed) / statistics.median(padded), 2),
        "runs": {"packed": [round(x) for x in packed], "padded": [round(x) for x in padded]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="examples sampled")
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prompts, with_image = real_prompts(Path(tmp))
    lengths = sample_lengths(args.n, prompts, with_image, args.seed)
    report = {
        "real_questions": int(len(prompts)),
        "with_images": int(with_image.sum()),
        "prompt_tokens_median": int(np.median(prompts)),
        "example_tokens": {
            "median": int(np.median(lengths)),
            "mean": int(lengths.mean()),
            "p90": int(np.percentile(lengths, 90)),
            "p99": int(np.percentile(lengths, 99)),
            "max": int(lengths.max()),
        },
        "efficiency": efficiency_table(lengths, args.seq, args.seed),
    }
    if not args.skip_train:
        report["cpu_training"] = train_throughput(lengths, args.repeats, args.seed)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
