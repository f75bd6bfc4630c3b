"""The factory's shard loop as shards grow 10x at a time: distill -> filter over N shards with a
fast loopback (sandbox) teacher, a first pass and a re-run over the finished run, on a local
folder and on ``s3://`` (a loopback moto server).

Each (store, shards, pass) runs in a fresh child process (so its peak RSS is its own) through the
one runner, ``run_stage`` with the local executor (``--workers`` shards at once: the runner's one
bound), and reports wall and CPU seconds, the driver's and its process tree's peak RSS, and on
``s3://`` the store requests it sent (counted on the s3fs client, retries included) per shard.
The sandbox teacher and the S3 server run in the parent, so their CPU is not counted.

    .venv/bin/python benchmarks/bench_scale.py --shards 100 1000 --stores local s3 --json scale.json
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
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from octomed_data import storage  # noqa: E402
from octomed_data.layout import RunPaths  # noqa: E402
from octomed_data.schema import QUESTION_SCHEMA, question_row  # noqa: E402
from octomed_data.stages.runner import RETRY  # noqa: E402

DRUGS = ["Metformin", "Insulin glargine", "Glipizide", "Sitagliptin"]


def write_questions(paths: RunPaths, shards: int, per_shard: int) -> None:
    """``shards`` shards of ``per_shard`` multiple-choice questions as the distill stage's input."""
    ds = storage.Dataset(paths.questions, QUESTION_SCHEMA)
    opts = {chr(65 + j): DRUGS[j] for j in range(4)}
    for s in range(shards):
        rows = [
            question_row(
                source="bench",
                split="train",
                task_type="text_mcq",
                question=f"Case {s}-{i}: new type 2 diabetes, HbA1c 7.{i % 10}%. First-line drug?",
                answer="A",
                input_file="bench",
                record_index=s * per_shard + i,
                options=opts,
            )
            for i in range(per_shard)
        ]
        ds.write_shard(f"bench-{s:05d}", rows)


# ------------------------------------------------------------------------------ the child: one pass
class TreePeak:
    """Peak RSS of this process and its descendants, sampled every ``every_s``."""

    def __init__(self, every_s: float = 0.1) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, args=(every_s,), daemon=True)
        self.thread.start()

    def run(self, every_s: float) -> None:
        import psutil

        while not self.stop.is_set():
            total = 0
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            self.stop.wait(every_s)

    def done(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.peak


def peak_mb() -> float:
    """This process's own peak RSS (MB): ``VmHWM``, the high-water mark of its address space.

    Not ``getrusage``'s ``ru_maxrss``: Linux folds into it the RSS of the address space a process
    had before ``execve``, i.e. the parent's at the moment it spawned the child (a parent that
    seeded a 1,000-shard run into its in-process S3 server made every child look 450 MB big)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def count_requests(uri: str) -> Counter:
    """Every request the store's s3fs client sends from now on, by operation (empty off S3)."""
    counts: Counter = Counter()
    if storage.protocol_of(uri) not in ("s3", "s3a"):
        return counts
    fs, _ = storage.filesystem(uri)
    lock = threading.Lock()

    def count(**kwargs: Any) -> None:
        with lock:
            counts[kwargs.get("event_name", "").rsplit(".", 1)[-1]] += 1

    fs.s3.meta.events.register("before-send.s3", count, unique_id="bench-scale-count")
    return counts


def child(args: argparse.Namespace) -> None:
    from octomed_data.stages import LocalExecutor, run_stage
    from octomed_data.stages.distill import DistillStage
    from octomed_data.stages.filter import FilterStage
    from octomed_data.teachers import DistillConfig

    logging.disable(logging.WARNING)
    if args.trace_memory:  # where the Python allocations of the pass are (slower; a diagnosis)
        import tracemalloc

        tracemalloc.start(16)
    paths = RunPaths(args.store, args.run_id)
    teacher = {"name": "sandbox", "base_url": args.base_url, "model": "bench", "max_in_flight": 64}
    config = DistillConfig.parse({"teachers": [teacher], "samples": args.samples})
    tree = TreePeak()
    counts = count_requests(paths.root)
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    stages: dict[str, Any] = {}
    loop = Counter()  # the shard loop's requests (run_stage without its finalize)
    if args.prefect:  # the flows' way: run_stage_flow per stage, its cards, one flow run
        import scale_prefect

        both = (DistillStage(paths, config), FilterStage(paths, samples_per_question=args.samples))
        stages = scale_prefect.run_pass(
            paths, both, args.workers, memory_trace if args.trace_memory else None
        )
        trace = stages.pop("trace", None)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        wall = round(time.perf_counter() - t0, 2)
        out = {
            "wall_s": wall,
            "cpu_s": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 2),
            "driver_peak_mb": peak_mb(),
            "loop_wall_s": wall,
            "loop_peak_mb": peak_mb(),
            "tree_peak_mb": round(max(tree.done() / 2**20, peak_mb()), 1),
            "requests": sum(counts.values()) if counts else None,
            "loop_requests": None,
            "requests_by_op": dict(counts),
            "stages": stages,
        }
        if trace is not None:
            out["trace"] = trace
        print("RESULT " + json.dumps(out), flush=True)
        return
    # Both shard loops first, then both finalize steps (the stages' global steps), so the loops'
    # own peak RSS and requests are measured apart from the statistics and cost passes.
    both = (DistillStage(paths, config), FilterStage(paths, samples_per_question=args.samples))
    for stage in both:
        s0, before = time.perf_counter(), Counter(counts)
        result = run_stage(
            stage, LocalExecutor(workers=args.workers, progress=False, retries=args.retries), finalize=False
        )
        states = Counter(o.state for o in result.outcomes.values())
        if result.failed or result.pending:
            first = next(iter(result.failed.items()), None)  # the first failure's own words
            raise SystemExit(
                f"{stage.name}: failed {len(result.failed)}, pending {len(result.pending)}; first: {first}"
            )
        loop += Counter(counts) - before
        stages[stage.name] = {
            "wall_s": round(time.perf_counter() - s0, 2),
            "states": dict(states),
            "stale": len(result.stale),
            "peak_after_mb": peak_mb(),
        }
    loop_peak = peak_mb()
    trace = memory_trace() if args.trace_memory else None
    loop_wall = time.perf_counter() - t0
    for stage in both:
        s1 = time.perf_counter()
        with stage.viewing():  # what run_stage does after the loop, inside its look at the markers
            stage.finalize(stage.input_shards())
        stages[stage.name]["finalize_s"] = round(time.perf_counter() - s1, 2)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    out = {
        "wall_s": round(time.perf_counter() - t0, 2),
        "cpu_s": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 2),
        "driver_peak_mb": peak_mb(),
        "loop_wall_s": round(loop_wall, 2),
        "loop_peak_mb": loop_peak,
        "tree_peak_mb": round(max(tree.done() / 2**20, peak_mb()), 1),
        "requests": sum(counts.values()) if counts else None,
        "loop_requests": sum(loop.values()) if counts else None,
        "requests_by_op": dict(counts),
        "loop_requests_by_op": dict(loop),
        "stages": stages,
    }
    if trace is not None:
        out["trace"] = trace
    print("RESULT " + json.dumps(out), flush=True)


def memory_trace() -> dict[str, Any]:
    """Python-allocated bytes now and at peak, the biggest allocation sites still held, and what
    the s3fs listing cache holds (native memory, e.g. aiohttp's and pyarrow's, is not traced)."""
    import tracemalloc

    cur, peak = tracemalloc.get_traced_memory()
    skip = [
        tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
        tracemalloc.Filter(False, "<unknown>"),
    ]
    top = tracemalloc.take_snapshot().filter_traces(skip).statistics("traceback")[:8]
    sites = []
    for stat in top:
        frames = [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in stat.traceback[-6:]]
        sites.append({"kb": round(stat.size / 1024, 1), "count": stat.count, "where": " < ".join(frames)})
    caches = {}
    import fsspec

    for cls in (fsspec.get_filesystem_class("s3"),):
        for fs in getattr(cls, "_cache", {}).values():
            caches[type(fs).__name__] = sum(len(v) for v in getattr(fs, "dircache", {}).values())
    return {"traced_mb": round(cur / 2**20, 1), "traced_peak_mb": round(peak / 2**20, 1), "sites": sites} | {
        "dircache_entries": caches
    }


# --------------------------------------------------------------------------------- the parent
def start_s3() -> tuple[Any, str]:
    from moto.server import ThreadedMotoServer

    from octomed_data.inference.vllm_service import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def seed_moto(local_root: str, bucket: str, s3_root: str) -> int:
    """Copy a finished local run into the in-process S3 server's own store, object by object.

    Not through s3fs: 30 objects a shard over HTTP took ~45 min at 10,000 shards. Only the re-run
    after the copy is measured, and it reads the objects through s3fs like any other pass."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    prefix = s3_root.split("://", 1)[1].split("/", 1)[1]
    copied = 0
    for path in sorted(Path(local_root).rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(local_root).as_posix()}"
            backend.put_object(bucket, key, path.read_bytes())
            copied += 1
    return copied


def one_pass(store: str, run_id: str, base_url: str, args: argparse.Namespace, env: dict[str, str]) -> dict:
    cmd = [sys.executable, __file__, "--child", "--store", store, "--run-id", run_id, "--base-url", base_url]
    cmd += ["--samples", str(args.samples), "--workers", str(args.workers), "--retries", str(args.retries)]
    cmd += ["--prefect"] if args.prefect else []
    cmd += ["--trace-memory"] if args.trace_memory else []
    if args.py_spy:  # a flame profile of each pass (py-spy samples the child from outside)
        out = Path(args.py_spy) / f"{run_id}-{len(list(Path(args.py_spy).glob(run_id + '-*')))}.txt"
        cmd = [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--format",
            "raw",
            "-r",
            "50",
            "-o",
            str(out),
            "--",
            *cmd,
        ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"pass failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-8000:]}")
    return json.loads(line.removeprefix("RESULT "))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    axis = argparse.ArgumentParser(add_help=False)
    axis.add_argument("--axis", choices=["shards", "samples"], default="shards")
    known, rest = axis.parse_known_args(argv)
    if known.axis == "samples":  # the samples axis: its own module and options
        import scale_samples

        scale_samples.main(rest)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--axis",
        choices=["shards", "samples"],
        default="shards",
        help="shards (this module) or samples (benchmarks/scale_samples.py, its options after this one)",
    )
    ap.add_argument(
        "--prefect",
        action="store_true",
        help="run each pass through Prefect (run_stage_flow, its cards) against one SQLite Prefect API; "
        "report its database bytes and artifact bytes after each pass",
    )
    ap.add_argument("--shards", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--stores", nargs="+", choices=["local", "s3"], default=["local", "s3"])
    ap.add_argument("--questions", type=int, default=2, help="questions per shard")
    ap.add_argument("--samples", type=int, default=1, help="samples per question")
    ap.add_argument("--workers", type=int, default=8, help="shards at once (the runner's bound)")
    ap.add_argument(
        "--retries",
        type=int,
        default=RETRY.retries,
        help="tries again per failed shard (default: the flows' policy; the CLI's is 0)",
    )
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument(
        "--s3-shards", type=int, nargs="+", default=None, help="on s3, only these of --shards (default: all)"
    )
    ap.add_argument(
        "--s3-first-max",
        type=int,
        default=100,
        help="above this many shards, the s3 re-run is over the finished local run copied to the bucket "
        "(a first pass through the loopback S3 server takes ~1 s a shard on 2 cores)",
    )
    ap.add_argument("--trace-memory", action="store_true", help="tracemalloc in each pass (a diagnosis)")
    ap.add_argument("--py-spy", default=None, help="a folder: profile each pass with py-spy (raw stacks)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--run-id", help=argparse.SUPPRESS)
    ap.add_argument("--base-url", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return

    from sandbox_process import start_sandbox_process

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the S3 server's request lines

    sandbox, base_url = start_sandbox_process("--latency-ms", "1", "--style", "mixed")
    s3 = prefect_server = None
    rows: list[dict[str, Any]] = []
    tmp = tempfile.mkdtemp(prefix="bench-scale-")
    args.stores = sorted(args.stores)  # local first: a big s3 re-run copies its finished run
    try:
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
        if args.prefect:
            import scale_prefect

            os.makedirs(f"{tmp}/prefect", exist_ok=True)
            prefect_server, api_url, prefect_db = scale_prefect.start_server(f"{tmp}/prefect")
            env.update(PREFECT_API_URL=api_url, PREFECT_LOGGING_TO_API_ENABLED="false")
        for kind in args.stores:
            if kind == "s3" and s3 is None:
                import s3fs

                s3, endpoint = start_s3()
                creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
                os.environ.update(creds, OCTOMED_S3_ENDPOINT_URL=endpoint)
                env.update(creds, OCTOMED_S3_ENDPOINT_URL=endpoint)
                bucket = f"octomed-bench-{uuid.uuid4().hex[:8]}"
                s3fs.S3FileSystem(endpoint_url=endpoint, key="bench", secret="bench").mkdir(bucket)
            store = f"{tmp}/local" if kind == "local" else f"s3://{bucket}"
            for n in args.shards:
                if kind == "s3" and args.s3_shards is not None and n not in args.s3_shards:
                    continue
                run_id = f"scale-{n}"
                seed = kind == "s3" and n > args.s3_first_max and "local" in args.stores
                passes = ("rerun",) if seed else ("first", "rerun")
                if seed:  # the finished local run, copied: a re-run over a finished run on s3://
                    copied = seed_moto(
                        RunPaths(f"{tmp}/local", run_id).root, bucket, RunPaths(store, run_id).root
                    )
                    print(
                        f"s3 {n}: the finished local run copied into the S3 server ({copied} objects)",
                        flush=True,
                    )
                else:
                    write_questions(RunPaths(store, run_id), n, args.questions)
                for name in passes:
                    res = one_pass(store, run_id, base_url, args, env)
                    row = {"store": kind, "shards": n, "pass": name, "seeded": seed} | res
                    row["files_per_shard"] = round(scale_prefect_files(RunPaths(store, run_id).root) / n, 2)
                    if args.prefect:  # what the Prefect API holds after this pass (every run so far)
                        row["prefect"] = scale_prefect.measure(api_url, prefect_db)
                    for key in ("requests", "loop_requests"):  # per shard of each of the 2 stages
                        per = res[key] / (2 * n) if res.get(key) is not None else None
                        row[key.replace("requests", "per_shard")] = round(per, 2) if per is not None else None
                    rows.append(row)
                    print_row(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        sandbox.kill()
        if s3 is not None:
            s3.stop()
        if prefect_server is not None:
            prefect_server.stop()
    growth = growth_rows(rows)
    for g in growth:
        print(
            f"growth {g['store']:5} {g['pass']:5} {g['from']}->{g['to']} shards: wall x{g['wall']}, "
            f"cpu x{g['cpu']}, driver peak RSS {g['driver_rss']:+.0%} (loops {g['loop_rss']:+.0%}, "
            f"loop wall x{g['loop_wall']}), tree {g['tree_rss']:+.0%}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "growth": growth}, indent=1))


def scale_prefect_files(root: str) -> int:
    import scale_prefect

    return scale_prefect.store_files(root)


def print_row(r: dict[str, Any]) -> None:
    req = "    n/a    n/a"
    if r["per_shard"] is not None:
        loop = f"{r['loop_per_shard']:6.2f}" if r["loop_per_shard"] is not None else "   n/a"
        req = f"{r['per_shard']:7.2f} {loop}"
    extra = ""
    if "prefect" in r:
        p = r["prefect"]
        extra = (
            f"  prefect db {p['db_bytes'] / 2**20:.1f} MB, {p['artifacts']} artifacts "
            f"{p['artifact_bytes'] / 1024:.1f} KB, {p['flow_runs']} flow runs"
        )
    print(
        f"{r['store']:5} {r['shards']:6} {r['pass']:5}  wall {r['wall_s']:8.1f} s  cpu {r['cpu_s']:8.1f} s  "
        f"driver {r['driver_peak_mb']:7.1f} MB (loops {r['loop_peak_mb']:6.1f})  tree {r['tree_peak_mb']:7.1f} MB  "
        f"requests/shard (all, loop) {req}  files/shard {r['files_per_shard']:.1f}{extra}",
        flush=True,
    )


def growth_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each 10x step of shards, per store and pass: wall and CPU ratios, RSS change."""
    out = []
    by = {(r["store"], r["pass"], r["shards"]): r for r in rows}
    for (store, name, n), a in sorted(by.items()):
        b = by.get((store, name, n * 10))
        if b is None:
            continue
        out.append(
            {
                "store": store,
                "pass": name,
                "from": n,
                "to": n * 10,
                "wall": round(b["wall_s"] / max(a["wall_s"], 1e-9), 2),
                "cpu": round(b["cpu_s"] / max(a["cpu_s"], 1e-9), 2),
                "driver_rss": round(b["driver_peak_mb"] / a["driver_peak_mb"] - 1, 3),
                "loop_rss": round(b["loop_peak_mb"] / a["loop_peak_mb"] - 1, 3),
                "loop_wall": round(b["loop_wall_s"] / max(a["loop_wall_s"], 1e-9), 2),
                "tree_rss": round(b["tree_peak_mb"] / a["tree_peak_mb"] - 1, 3),
            }
        )
    return out


if __name__ == "__main__":
    main()
