"""``bench_distill.py --vs-curator``: bespokelabs-curator and the engine, each in a child process.

curator runs in its own cached venv (``distill_curator_worker.py``); the engine runs as
``bench_distill.py --worker``. Per run: steady samples/s, client CPU of the child and its
descendants, peak RSS of the process tree.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
from distill_bench_common import IN_FLIGHT, N, dir_bytes, steady_rate, write_questions

from octomed_data import storage
from octomed_data.prompts import build_messages
from octomed_data.schema import QUESTION_SCHEMA

ROOT = Path(__file__).resolve().parent.parent
ENGINE_SCRIPT = Path(__file__).resolve().parent / "bench_distill.py"  # its --worker mode


CURATOR = "bespokelabs-curator==0.1.31"


def curator_python() -> tuple[str, dict[str, str]]:
    """curator's own venv (built once, cached) and the environment it runs offline with."""
    from octomed_data.venvs import cached_venv

    python, _ = cached_venv("curator-0.1.31", [[CURATOR]], log=lambda m: print(m, file=sys.stderr))
    site = subprocess.run(
        [python, "-c", "import litellm, os; print(os.path.dirname(litellm.__file__))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    env = {
        **os.environ,
        "TIKTOKEN_CACHE_DIR": os.path.join(site, "litellm_core_utils", "tokenizers"),
        "TELEMETRY_ENABLED": "false",
        "CURATOR_DISABLE_RICH_DISPLAY": "1",  # its live console costs CPU: curator at its leanest
        "HF_DATASETS_OFFLINE": "1",
    }
    env.pop("PYTHONPATH", None)
    return python, env


class LineTail:
    """Times lines appended to the files matching ``pattern`` under ``root`` (read by the parent)."""

    def __init__(self, root: str, pattern: str = "responses_") -> None:
        self.root, self.pattern = root, pattern
        self.offsets: dict[str, int] = {}
        self.stamps: list[float] = []

    def poll(self) -> None:
        now = time.perf_counter()
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                if not (f.startswith(self.pattern) and f.endswith(".jsonl")):
                    continue
                path = os.path.join(dirpath, f)
                try:
                    with open(path, "rb") as fh:
                        fh.seek(self.offsets.get(path, 0))
                        chunk = fh.read()
                except OSError:
                    continue
                complete = chunk.rfind(b"\n") + 1
                self.offsets[path] = self.offsets.get(path, 0) + complete
                self.stamps.extend([now] * chunk[:complete].count(b"\n"))


def measured(cmd: list[str], env: dict[str, str], tail: LineTail | None = None) -> dict:
    """Run ``cmd`` as a child; its CPU (with every descendant), peak tree RSS, its JSON output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT
    )
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.NoSuchProcess:
            pass
        if tail is not None:
            tail.poll()
        time.sleep(0.05)
    wall = time.perf_counter() - started
    if tail is not None:
        tail.poll()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = proc.stdout.read().strip().splitlines()
    if proc.returncode != 0 or not out:
        raise SystemExit(f"{cmd[:3]} failed (rc {proc.returncode})")
    result = json.loads(out[-1])
    result.update(
        cpu_s=round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2),
        peak_rss_mb=round(peak / 2**20, 1),
        wall_s=round(wall, 2),
    )
    return result


def vs_curator(base_url: str, work: str, rounds: int, questions: int) -> dict:
    python, cur_env = curator_python()
    q_uri = storage.join(work, "vs-q")
    write_questions(q_uri, "00000", questions, 0)
    rows = storage.Dataset(q_uri, QUESTION_SCHEMA).read_all().to_pylist()
    prompts = os.path.join(work, "prompts.json")
    with open(prompts, "w") as fh:
        json.dump([build_messages(r) for r in rows], fh)  # the engine's own messages
    eng_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs: dict[str, list[dict]] = {"curator": [], "octomed": []}
    for r in range(rounds):
        order = ["curator", "octomed"] if r % 2 == 0 else ["octomed", "curator"]
        for who in order:
            if who == "curator":
                cache = os.path.join(work, f"curator-cache-{r}")
                env = {**cur_env, "CURATOR_CACHE_DIR": cache}
                tail = LineTail(cache)
                cmd = [python, str(ROOT / "benchmarks" / "distill_curator_worker.py"), prompts, base_url]
                res = measured([*cmd, str(N), str(IN_FLIGHT)], env, tail)
                res["steady"] = round(steady_rate(tail.stamps), 1)
                res["stored"] = res.pop("rows")
            else:
                out = storage.join(work, f"vs-out-{r}")
                cmd = [
                    sys.executable,
                    str(ENGINE_SCRIPT),
                    "--worker",
                    "--base-url",
                    base_url,
                    "--questions",
                    q_uri,
                ]
                res = measured([*cmd, "--out", out], eng_env)
                res["journal_bytes_after"] = dir_bytes(os.path.join(out, "_journal"))
                res["raw_bytes"] = dir_bytes(os.path.join(out, "raw"))
            res["cpu_ms_per_sample"] = round(1000 * res["cpu_s"] / max(1, res["stored"]), 3)
            runs[who].append(res)
            print(f"round {r} {who}: {json.dumps(res)}", file=sys.stderr, flush=True)
    med = {
        who: {k: statistics.median(x[k] for x in rs) for k in ("steady", "cpu_ms_per_sample", "peak_rss_mb")}
        for who, rs in runs.items()
    }
    ratios = [o["steady"] / c["steady"] for o, c in zip(runs["octomed"], runs["curator"], strict=True)]
    cpu = [
        o["cpu_ms_per_sample"] / c["cpu_ms_per_sample"]
        for o, c in zip(runs["octomed"], runs["curator"], strict=True)
    ]
    return {
        "samples_per_round": questions * N,
        "runs": runs,
        "median": med,
        "throughput_ratio_median": round(statistics.median(ratios), 3),
        "cpu_per_sample_ratio_median": round(statistics.median(cpu), 3),
    }
