"""The factory as samples grow 10x at a time: distill -> filter -> mixture -> export of N samples
with a fast loopback (sandbox) teacher, the samples axis of issue 26's ``bench_scale.py``.

The sandbox teacher runs in its own process (started here, latency 0) and honours ``n`` (as vLLM
does; the teacher is configured with ``supports_n``), so one request returns every sample of a
question; each sample is still verified, journalled, compacted, filtered, mixed and exported on its
own. Each size runs in a fresh child process through the one runner: ``run_stage`` with the local
executor for distill and filter, then the mixture and the export as the command line runs them
(``run_global_step``). Per size: wall and CPU seconds of the child (the driver; the teacher's CPU is
its own process's), the driver's peak RSS, the peak RSS of the child's process tree and of the whole
tree (this process, the teacher and the child), bytes and files written, and the same per step.

    .venv/bin/python benchmarks/scale_samples.py --samples 50000 500000 2000000 --json samples.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for entry in (ROOT, ROOT / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

DRUGS = ["Metformin", "Insulin glargine", "Glipizide", "Sitagliptin"]
STEPS = ("distill", "filter", "mixture", "export")


def write_questions(run_root: str, questions: int, per_shard: int) -> int:
    """``questions`` multiple-choice questions in shards of ``per_shard``; returns the shard count."""
    from octomed_data import storage
    from octomed_data.layout import RunPaths
    from octomed_data.schema import QUESTION_SCHEMA, question_row

    ds = storage.Dataset(RunPaths.at(run_root).questions, QUESTION_SCHEMA)
    opts = {chr(65 + j): DRUGS[j] for j in range(4)}
    shards = 0
    for start in range(0, questions, per_shard):
        rows = [
            question_row(
                source=f"bench{i % 3}",
                split="train",
                task_type="text_mcq",
                question=f"Case {i}: new type 2 diabetes, HbA1c 7.{i % 10}%, eGFR {40 + i % 50}. First-line drug?",
                answer="A",
                input_file="bench",
                record_index=i,
                options=opts,
            )
            for i in range(start, min(questions, start + per_shard))
        ]
        ds.write_shard(f"bench-{shards:05d}", rows)
        shards += 1
    return shards


def disk_usage(path: str) -> tuple[int, int]:
    """(bytes, files) under ``path``."""
    size = files = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            try:
                size += os.path.getsize(os.path.join(dirpath, name))
                files += 1
            except OSError:
                continue
    return size, files


# ------------------------------------------------------------------------------ the child: one size
def child(args: argparse.Namespace) -> None:
    from bench_scale import TreePeak

    from octomed_data.layout import RunPaths
    from octomed_data.mixture import MixtureConfig
    from octomed_data.recipe import ExportSettings
    from octomed_data.stages import LocalExecutor, run_stage
    from octomed_data.stages.committed import raise_unless_committed, run_global_step
    from octomed_data.stages.distill import DistillStage
    from octomed_data.stages.filter import FilterStage
    from octomed_data.stages.mixture import ExportStage, MixtureStage
    from octomed_data.teachers import DistillConfig

    logging.disable(logging.WARNING)
    commits = count_commits()
    paths = RunPaths.at(args.root)
    teacher = {
        "name": "sandbox",
        "base_url": args.base_url,
        "model": "bench",
        "max_in_flight": args.in_flight,
        "supports_n": True,
    }
    config = DistillConfig.parse({"teachers": [teacher], "samples": args.per_question})
    executor = LocalExecutor(workers=args.workers, progress=False)

    def shard_step(stage: Any) -> dict[str, Any]:
        result = run_stage(stage, executor)
        raise_unless_committed(result)
        return {"shards": len(result.outcomes)}

    steps = {
        "distill": lambda: shard_step(DistillStage(paths, config)),
        "filter": lambda: shard_step(FilterStage(paths, samples_per_question=args.per_question)),
        "mixture": lambda: run_global_step(MixtureStage(paths, MixtureConfig(memory_mb=args.memory_mb))),
        "export": lambda: run_global_step(ExportStage(paths, ExportSettings().model_dump())),
    }
    tree = TreePeak()
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    out_steps: dict[str, Any] = {}
    for name in STEPS:
        step_tree = TreePeak()
        commits["n"] = 0
        s0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        counts = steps[name]()
        c1 = resource.getrusage(resource.RUSAGE_SELF)
        size, files = disk_usage(os.path.join(args.root, name))
        out_steps[name] = {
            "wall_s": round(time.perf_counter() - s0, 2),
            "cpu_s": round(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, 2),
            "tree_peak_mb": round(step_tree.done() / 2**20, 1),
            "driver_peak_after_mb": round(c1.ru_maxrss / 1024, 1),
            "bytes": size,
            "files": files,
            "write_shard_calls": commits["n"],  # Dataset.write_shard (the spills included; not ShardWriter)
            "counts": summarise(name, counts),
        }
        print(f"STEP {name} " + json.dumps(out_steps[name]), flush=True)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    size, files = disk_usage(args.root)
    out = {
        "wall_s": round(time.perf_counter() - t0, 2),
        "cpu_s": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 2),
        "driver_peak_mb": round(r1.ru_maxrss / 1024, 1),
        "child_tree_peak_mb": round(max(tree.done(), r1.ru_maxrss * 1024) / 2**20, 1),
        "bytes": size,
        "files": files,
        "steps": out_steps,
    }
    print("RESULT " + json.dumps(out), flush=True)


def count_commits() -> dict[str, int]:
    """Counts every ``Dataset.write_shard`` in this process from now on (one commit: a Parquet
    file and its marker), so a step's temporary spill shards show even after it removed them."""
    import threading

    from octomed_data import storage

    counts = {"n": 0}
    lock = threading.Lock()
    write = storage.Dataset.write_shard

    def counted(self: Any, *a: Any, **kw: Any) -> Any:
        with lock:
            counts["n"] += 1
        return write(self, *a, **kw)

    storage.Dataset.write_shard = counted  # type: ignore[method-assign]
    return counts


def summarise(step: str, counts: dict[str, Any]) -> dict[str, Any]:
    """The few counts of a step's result the table needs."""
    if step == "mixture":
        return {"rows_train": counts.get("rows_train"), "rows_validation": counts.get("rows_validation")}
    if step == "export":
        rows = counts.get("rows", {}).get("llamafactory", {})
        return {"rows": rows, "duplicates": counts.get("duplicates")}
    return counts


def accepted_of(root: str) -> int | None:
    from octomed_data import storage
    from octomed_data.layout import RunPaths

    stats = RunPaths.at(root).stats
    if not storage.exists(stats):
        return None
    return storage.read_json(stats).get("overall", {}).get("accepted")


# --------------------------------------------------------------------------------- the parent
def one_size(samples: int, base_url: str, args: argparse.Namespace, work: str) -> dict[str, Any]:
    from bench_scale import TreePeak

    questions = max(1, samples // args.per_question)
    root = os.path.join(work, f"samples-{samples}")
    shards = write_questions(root, questions, args.shard_questions)
    cmd = [sys.executable, __file__, "--child", "--root", root, "--base-url", base_url]
    cmd += ["--per-question", str(args.per_question), "--workers", str(args.workers)]
    cmd += ["--in-flight", str(args.in_flight), "--memory-mb", str(args.memory_mb)]
    whole = TreePeak()  # this process, the teacher and the child (and anything it starts)
    env = dict(os.environ, OPENAI_API_KEY=os.environ.get("OPENAI_API_KEY", "sk-bench-sandbox"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result = None
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("STEP "):
            print(f"  {samples}: {line.strip()}", file=sys.stderr, flush=True)
        elif line.startswith("RESULT "):
            result = json.loads(line.removeprefix("RESULT "))
    err = proc.stderr.read() if proc.stderr else ""
    code = proc.wait()
    whole_peak = whole.done()
    if code != 0 or result is None:
        raise SystemExit(f"size {samples} failed ({code}): {err[-2000:]}")
    row = {
        "samples": questions * args.per_question,
        "questions": questions,
        "shards": shards,
        "accepted": accepted_of(root),
        "whole_tree_peak_mb": round(whole_peak / 2**20, 1),
    } | result
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return row


def growth(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each consecutive pair of sizes: wall and CPU ratios, normalised to a 10x step
    (``ratio ** (1 / log10(size ratio))``), and the peak RSS change."""
    import math

    out = []
    for a, b in zip(rows, rows[1:], strict=False):
        k = b["samples"] / a["samples"]
        per10 = 1 / math.log10(k)

        def norm(x: float, y: float, per10: float = per10) -> float:
            return round((y / max(x, 1e-9)) ** per10, 2)

        out.append(
            {
                "from": a["samples"],
                "to": b["samples"],
                "size_ratio": round(k, 2),
                "wall": round(b["wall_s"] / a["wall_s"], 2),
                "cpu": round(b["cpu_s"] / a["cpu_s"], 2),
                "wall_per_10x": norm(a["wall_s"], b["wall_s"]),
                "cpu_per_10x": norm(a["cpu_s"], b["cpu_s"]),
                "steps_wall_per_10x": {
                    s: norm(a["steps"][s]["wall_s"], b["steps"][s]["wall_s"]) for s in STEPS
                },
                "steps_cpu_per_10x": {s: norm(a["steps"][s]["cpu_s"], b["steps"][s]["cpu_s"]) for s in STEPS},
                "driver_rss": round(b["driver_peak_mb"] / a["driver_peak_mb"] - 1, 3),
                "whole_tree_rss": round(b["whole_tree_peak_mb"] / a["whole_tree_peak_mb"] - 1, 3),
            }
        )
    return out


def print_row(r: dict[str, Any]) -> None:
    steps = "  ".join(f"{s} {r['steps'][s]['wall_s']:.0f}s" for s in STEPS)
    print(
        f"{r['samples']:>9,} samples {r['questions']:>7,} q {r['shards']:>4} shards  accepted {r['accepted']:>9,}  "
        f"wall {r['wall_s']:8.1f} s  cpu {r['cpu_s']:8.1f} s  driver {r['driver_peak_mb']:7.1f} MB  "
        f"child tree {r['child_tree_peak_mb']:7.1f} MB  whole tree {r['whole_tree_peak_mb']:7.1f} MB  "
        f"{r['bytes'] / 1e6:9.1f} MB in {r['files']} files  [{steps}]",
        flush=True,
    )


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scale_samples", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--samples", type=int, nargs="+", default=[50_000, 500_000, 2_000_000])
    ap.add_argument("--per-question", type=int, default=16, help="samples per question (the paper's N)")
    ap.add_argument("--shard-questions", type=int, default=1000, help="questions per shard")
    ap.add_argument("--workers", type=int, default=2, help="shards at once (the runner's bound)")
    ap.add_argument("--in-flight", type=int, default=64, help="teacher requests in flight (n samples each)")
    ap.add_argument("--memory-mb", type=int, default=256, help="mixture.memory_mb (the one memory bound)")
    ap.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep each size's run folder")
    ap.add_argument("--json", default=None, help="write the results here (after every size)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--base-url", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse(argv)
    if args.child:
        child(args)
        return
    from sandbox_process import start_sandbox_process

    sandbox, base_url = start_sandbox_process(
        "--latency-ms", "0", "--style", "mixed", "--faults", json.dumps({"honour_n": True})
    )
    work = args.work or tempfile.mkdtemp(prefix="scale-samples-")
    os.makedirs(work, exist_ok=True)
    rows: list[dict[str, Any]] = []
    try:
        for n in sorted(args.samples):
            rows.append(one_size(n, base_url, args, work))
            print_row(rows[-1])
            if args.json:
                Path(args.json).write_text(json.dumps({"rows": rows, "growth": growth(rows)}, indent=1))
    finally:
        sandbox.kill()
        sandbox.wait(10)
        if not args.work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for g in growth(rows):
        print(
            f"growth {g['from']:,} -> {g['to']:,} (x{g['size_ratio']}): wall x{g['wall']} cpu x{g['cpu']}; "
            f"per 10x: wall x{g['wall_per_10x']} cpu x{g['cpu_per_10x']}; driver RSS {g['driver_rss']:+.0%}, "
            f"whole tree {g['whole_tree_rss']:+.0%}; steps per 10x (wall) {g['steps_wall_per_10x']} "
            f"(cpu) {g['steps_cpu_per_10x']}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
