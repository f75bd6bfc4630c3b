"""Loader read rate on the real files, this tree vs a baseline checkout, and streamed-array memory.

    .venv/bin/python benchmarks/bench_sources.py --runs 5 [--baseline /path/to/other/checkout]

Each round runs one fresh process per tree (alternating which goes first) that reads seven real
inputs of ../shared/data through ``iter_records`` (fingerprint-only image store); the medians of
the rounds are printed side by side. Then the peak Python allocation (tracemalloc) of reading a
generated ~24 MiB JSON array streamed (``iter_json_records``) vs ``json.load`` of the same file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("OCTOMED_SHARED_DATA", ROOT.parent / "shared" / "data"))
CASES = [
    ("medqa", "medqa/phrases_no_exclude_test.jsonl", None),
    ("medmcqa", "medmcqa/dev.json", None),
    ("mmlu_pro", "huatuogpt_o1_eval/MMLU-Pro_Medical_test.json", None),
    ("pubmedqa", "pubmedqa", None),
    ("mmlu", "mmlu_medical", None),
    ("pathvqa", "pathvqa/pvqa_test.json", None),
    ("vqa_rad", "vqa_rad/VQA_RAD_Dataset_Public.json", "vqa_rad/images"),
]


def read_once() -> None:
    """One timed pass over the cases (run inside the tree under test); prints records and seconds."""
    from octomed_data.images import ImageStore
    from octomed_data.sources import iter_records

    started, n = time.perf_counter(), 0
    for fmt, rel, images in CASES:
        kw = {"images_dir": str(DATA / images)} if images else {}
        n += sum(1 for _ in iter_records(fmt, str(DATA / rel), image_store=ImageStore(None), **kw))
    print(json.dumps({"records": n, "seconds": time.perf_counter() - started}))


def run_tree(tree: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run(
        [sys.executable, __file__, "--once"], env=env, cwd=tree, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def streamed_peak() -> tuple[float, float, float]:
    """(file MiB, peak MiB streamed, peak MiB json.load) for a generated JSON array."""
    sys.path.insert(0, str(ROOT))
    from octomed_data.sources.paths import SourcePath
    from octomed_data.sources.readers import iter_json_records

    seed = json.loads((DATA / "huatuogpt_o1_eval/MMLU-Pro_Medical_test.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big_test.json"
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("[")
            n = 0
            while fh.tell() < 24 * 2**20:
                for rec in seed:
                    fh.write(("," if n else "") + json.dumps(dict(rec, n=n), ensure_ascii=False))
                    n += 1
            fh.write("]")
        peaks = []
        for read in (
            lambda: sum(1 for _ in iter_json_records(SourcePath.of(path))),
            lambda: len(json.loads(path.read_text(encoding="utf-8"))),
        ):
            tracemalloc.start()
            read()
            peaks.append(tracemalloc.get_traced_memory()[1] / 2**20)
            tracemalloc.stop()
        return path.stat().st_size / 2**20, peaks[0], peaks[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--baseline", type=Path, help="another checkout to time side by side")
    ap.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.once:
        read_once()
        return
    trees = {"this tree": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    times: dict[str, list[float]] = {k: [] for k in trees}
    records = 0
    for r in range(args.runs):
        order = list(trees.items()) if r % 2 == 0 else list(reversed(trees.items()))
        for name, tree in order:
            res = run_tree(tree)
            records = res["records"]
            times[name].append(res["seconds"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:10s} {records} records  median {med:.2f}s  ({records / med:,.0f} records/s)  runs {ts}")
    if args.baseline:
        ratio = statistics.median(times["this tree"]) / statistics.median(times["baseline"])
        print(f"ratio this/baseline: {ratio:.2f}")
    size, streamed, whole = streamed_peak()
    print(f"JSON array {size:.1f} MiB: peak {streamed:.1f} MiB streamed, {whole:.1f} MiB with json.load")


if __name__ == "__main__":
    main()
