"""Benchmark the evaluation harness's throughput: questions/s and generated tokens/s.

1. ``openai`` backend against the loopback sandbox (a separate process) with a fixed reply latency,
   at several concurrency levels. Every run is the whole harness (``evaluation.harness.evaluate``):
   MedQA test items read with the source loader, one request per (item, seed), THE answer
   extraction, predictions committed to Parquet, metrics/plot/report written. The baseline beside
   it is the latency bound ``concurrency / latency`` (requests/s a client could reach if nothing
   but the server's latency counted).
2. ``hf`` backend: the tiny random Qwen2 (``training.tiny``) through HF generate on CPU, at batch
   sizes 1 and 8 (batch 1 is the baseline), with a fixed budget (the random model rarely stops early).

Each configuration runs ``--rounds`` times; the median is reported (noisy shared VM).

    .venv/bin/python benchmarks/bench_eval.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evaluation.harness import evaluate  # noqa: E402
from octomed_data import storage  # noqa: E402
from octomed_data.job_config import EvalConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_distill import start_server  # noqa: E402  (the sandbox in its own process, one way)


def one_run(config: EvalConfig) -> dict[str, float]:
    """Run the harness once; questions/s and generated tokens/s over its wall time."""
    started = time.perf_counter()
    result = evaluate(config, progress=False)
    wall = time.perf_counter() - started
    rows = storage.Dataset(result.predictions_uri).read_all(columns=["completion_tokens"])
    tokens = sum(rows.column("completion_tokens").to_pylist())
    return {
        "wall_s": wall,
        "predictions": result.predictions,
        "questions_per_s": result.predictions / wall,
        "tokens_per_s": tokens / wall,
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}


def bench_openai(args: argparse.Namespace, out: Path) -> list[dict]:
    proc, url = start_server(args.latency_ms)
    results = []
    try:
        for conc in args.concurrency:
            runs = []
            for i in range(args.rounds):
                cfg = EvalConfig(
                    model=url,
                    benchmarks=["medqa"],
                    data_dir=args.data_dir,
                    output_uri=str(out / f"openai-{conc}-{i}"),
                    limit=args.items,
                    seeds=args.seeds,
                    concurrency=conc,
                )
                runs.append(one_run(cfg))
            bound = conc / (args.latency_ms / 1000.0)
            row = {
                "backend": "openai",
                "concurrency": conc,
                **median_of(runs),
                "latency_bound_q_per_s": bound,
            }
            print(json.dumps(row), flush=True)
            results.append(row)
    finally:
        proc.terminate()
        proc.wait(10)
    return results


def bench_hf(args: argparse.Namespace, out: Path) -> list[dict]:
    from training.tiny import build_text_model

    model = build_text_model(out / "tiny")
    results = []
    for batch in (1, 8):
        runs = []
        for i in range(args.rounds):
            cfg = EvalConfig(
                model=str(model),
                benchmarks=["medqa"],
                data_dir=args.data_dir,
                output_uri=str(out / f"hf-{batch}-{i}"),
                limit=args.hf_items,
                seeds=1,
                max_new_tokens=args.hf_tokens,
                batch_size=batch,
            )
            runs.append(one_run(cfg))
        row = {"backend": "hf-tiny", "batch_size": batch, "max_new_tokens": args.hf_tokens, **median_of(runs)}
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--items", type=int, default=200, help="MedQA items per openai run")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--latency-ms", type=float, default=100.0)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 128])
    p.add_argument("--hf-items", type=int, default=16)
    p.add_argument("--hf-tokens", type=int, default=32)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--skip-hf", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        out = Path(tmp)
        results = bench_openai(args, out)
        if not args.skip_hf:
            results += bench_hf(args, out)
    print(json.dumps({"results": results}, indent=1))


if __name__ == "__main__":
    main()
