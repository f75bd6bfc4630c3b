"""Ingest throughput (records/s) and peak RSS on the real upstream files.

Each case runs in a fresh subprocess (so peak RSS is that ingest's alone, imports included)
``--runs`` times; the table reports the median. Timing starts after imports, so records/s is
the loaders' + Parquet writer's throughput, not interpreter start-up. Usage:

    .venv/bin/python benchmarks/bench_ingest.py [--runs 5] [--data ../shared/data] [--case NAME ...]

Prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name -> (format, input relative to the data folder, --images relative to it, options)
CASES: dict[str, tuple[str, str, str | None, dict[str, str]]] = {
    "medmcqa dev (text, 4183)": ("medmcqa", "medmcqa/dev.json", None, {}),
    "medxpertqa text (text, 2450)": ("medxpertqa", "medxpertqa/medxpertqa_text.jsonl", None, {}),
    "pubmedqa pqa-l (yes/no, 1000)": ("pubmedqa", "pubmedqa/ori_pqal.json", None, {}),
    "pathvqa textbook (text, 5429)": ("pathvqa", "pathvqa/QA_pairs_vb.json", None, {}),
    "vqa_rad public (image, 2248 / 12 images)": (
        "vqa_rad",
        "vqa_rad/VQA_RAD_Dataset_Public.json",
        "vqa_rad/images",
        {},
    ),
    "imaging DICOM+NIfTI csv (16 files)": ("imaging", "@sample/imaging/labels.csv", None, {}),
}

_CHILD = r"""
import json, resource, sys, time
import pandas, pyarrow.parquet  # noqa: F401  (pyarrow imports pandas on the first shard: not ingest work)
from octomed_data.stages.ingest import ingest
fmt, src, out, images, options = json.loads(sys.argv[1])
t = time.perf_counter()
r = ingest(fmt, src, out, images=images, **options)
dt = time.perf_counter() - t
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"records": r.records, "questions": r.questions, "images": r.images_decoded,
                  "seconds": dt, "peak_rss_mb": peak_kb / 1024}))
"""


def run_case(fmt: str, src: str, images: str | None, options: dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as out:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps([fmt, src, out, images, options])],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--data", default=os.environ.get("OCTOMED_SHARED_DATA", str(REPO.parent / "shared" / "data"))
    )
    parser.add_argument("--case", action="append", help="run only cases whose name contains this")
    args = parser.parse_args()
    data = Path(args.data)
    sample = REPO / "octomed_data" / "sample_data"
    print(f"ingest benchmark: median of {args.runs} runs, each in a fresh process (local disk output)\n")
    print("| input | records | questions | images decoded | seconds | records/s | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (fmt, rel, images, options) in CASES.items():
        if args.case and not any(c in name for c in args.case):
            continue
        src = str(sample / rel[len("@sample/") :]) if rel.startswith("@sample/") else str(data / rel)
        runs = [run_case(fmt, src, str(data / images) if images else None, options) for _ in range(args.runs)]
        secs = statistics.median(r["seconds"] for r in runs)
        rss = statistics.median(r["peak_rss_mb"] for r in runs)
        first = runs[0]
        print(
            f"| {name} | {first['records']} | {first['questions']} | {first['images']} | {secs:.3f} "
            f"| {first['records'] / secs:,.0f} | {rss:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
