"""Decontamination throughput and memory, on the real files and at 1M-question scale.

    .venv/bin/python benchmarks/bench_decontam.py                 # everything, medians of 3
    .venv/bin/python benchmarks/bench_decontam.py --n 200000 --repeats 1   # quicker

(a) real files: the held-out benchmark files themselves, ingested with ``octomed_data.ingest``
    (not timed), then ``decontaminate`` over them (timed; ~100% must be removed), and PathVQA's
    textbook QA pairs (mostly kept). Each decontamination runs in a fresh process for its peak RSS.
(b) scale: ``--n`` questions of realistic length built from real question text (MedMCQA stems,
    MedQA vignettes, PubMedQA context + question), sentence-shuffled with one word in six replaced
    so they are NOT contaminated, plus a known 5% of exact copies; checked against the full
    registry in one process on one core. Reports index build time, index size (array bytes, .npz
    bytes, RSS delta), questions/s of ``check_table`` on in-memory batches, and questions/s of
    ``decontaminate`` end to end over Parquet shards on local disk.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pyarrow as pa  # noqa: E402

from octomed_data import storage  # noqa: E402
from octomed_data.decontam.index import DecontamIndex  # noqa: E402
from octomed_data.decontam.text import tokens  # noqa: E402
from octomed_data.schema import QUESTION_SCHEMA  # noqa: E402
from octomed_data.stages.decontaminate import decontaminate  # noqa: E402

DATA = Path(os.environ.get("OCTOMED_SHARED_DATA", REPO.parent / "shared" / "data"))
BATCH = 8192
COPY_FRACTION = 0.05

REAL_INPUTS = [  # (format, file, images) — the held-out files themselves
    ("medqa", "medqa/phrases_no_exclude_test.jsonl", None),
    ("medqa", "medqa/medqa_test_5opt.jsonl", None),
    ("medmcqa", "medmcqa/dev.json", None),
    ("pubmedqa", "pubmedqa/ori_pqal.json", None),
    ("mmlu", "mmlu_medical", None),
    ("mmlu_pro", "huatuogpt_o1_eval/MMLU-Pro_Medical_test.json", None),
    ("medxpertqa", "medxpertqa/medxpertqa_text.jsonl", None),
    ("medbullets", "medreason_eval/medbullets_op5.jsonl", None),
    ("vqa_rad", "vqa_rad/testset.json", "vqa_rad/images"),
    ("omnimedvqa", "omnimedvqa/MRI_CT_XRAY_300each_dataset.json", "omnimedvqa"),
]


def rss_mb() -> float:
    """Current resident set size of this process (MB)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


# --------------------------------------------------------------------------- (a) real files


def _decontam_child(questions: str, out: str) -> None:
    """Runs in a fresh process: build the index, decontaminate, print JSON with timings and peak RSS."""
    t0 = time.perf_counter()
    index = DecontamIndex.from_registry()
    t1, c1 = time.perf_counter(), time.process_time()
    result = decontaminate(questions, out, index=index)
    t2, c2 = time.perf_counter(), time.process_time()
    print(
        json.dumps(
            {
                "input": result.input,
                "kept": result.kept,
                "removed": result.removed,
                "by_kind": result.by_kind,
                "index_s": t1 - t0,
                "decontam_s": t2 - t1,
                "decontam_cpu_s": c2 - c1,
                "peak_rss_mb": peak_rss_mb(),
            }
        )
    )


def bench_real(work: Path, repeats: int) -> dict:
    from octomed_data.stages.ingest import ingest

    benchmarks_out = work / "benchmarks"
    for fmt, rel, images in REAL_INPUTS:
        ingest(
            fmt,
            str(DATA / rel),
            str(benchmarks_out),
            images=str(DATA / images) if images else None,
            shard_prefix=f"{fmt}-{Path(rel).stem}".replace("_", "-").replace(".", "-"),
        )
    textbook_out = work / "textbook"
    ingest("pathvqa", str(DATA / "pathvqa" / "QA_pairs_vb.json"), str(textbook_out))
    report = {}
    for name, src in (("benchmark files", benchmarks_out), ("pathvqa textbook", textbook_out)):
        runs = []
        for r in range(repeats):
            cmd = [sys.executable, __file__, "_child", str(src), str(work / f"dc-{name[:4]}-{r}")]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        last = runs[-1]
        secs = statistics.median(x["decontam_s"] for x in runs)
        report[name] = {
            "questions": last["input"],
            "removed": last["removed"],
            "kept": last["kept"],
            "removed_pct": round(100 * last["removed"] / max(1, last["input"]), 2),
            "by_kind": last["by_kind"],
            "decontam_s_median": round(secs, 3),
            "questions_per_s": round(last["input"] / secs),
            "questions_per_cpu_s": round(
                last["input"] / statistics.median(x["decontam_cpu_s"] for x in runs)
            ),
            "index_build_s_median": round(statistics.median(x["index_s"] for x in runs), 3),
            "peak_rss_mb_median": round(statistics.median(x["peak_rss_mb"] for x in runs), 1),
        }
    return report


# --------------------------------------------------------------------------- (b) scale


def _real_texts() -> dict[str, list[tuple[str, list[str]]]]:
    def jsonl(rel: str) -> list[dict]:
        return [json.loads(x) for x in (DATA / rel).read_text().splitlines() if x.strip()]

    pqal = json.loads((DATA / "pubmedqa" / "ori_pqal.json").read_text())
    return {
        "medmcqa": [
            (r["question"], [r[k] for k in ("opa", "opb", "opc", "opd")]) for r in jsonl("medmcqa/dev.json")
        ],
        "medqa": [
            (r["question"], list(r["options"].values())) for r in jsonl("medqa/phrases_no_exclude_test.jsonl")
        ],
        "pubmedqa": [
            ("Context:\n" + "\n".join(v["CONTEXTS"]) + "\n\nQuestion: " + v["QUESTION"], [])
            for v in pqal.values()
        ],
    }


_SENTENCE = re.compile(r"(?<=[.?!])\s+")


class QuestionMaker:
    """Realistic-length training questions from real text: mostly not contaminated, a known 5% copies."""

    MIX = (("medmcqa", 0.5), ("medqa", 0.35), ("pubmedqa", 0.15))

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.texts = _real_texts()
        self.words = sorted({w for texts in self.texts.values() for t, _ in texts[:500] for w in t.split()})
        self.sources = [s for s, _ in self.MIX]
        self.weights = [w for _, w in self.MIX]

    def question(self) -> tuple[str, list[str], bool]:
        """(text, option texts, is_exact_copy); options are the real ones, shuffled."""
        source = self.rng.choices(self.sources, self.weights)[0]
        text, options = self.rng.choice(self.texts[source])
        options = self.rng.sample(options, len(options))
        if self.rng.random() < COPY_FRACTION:
            return text, options, True
        sentences = _SENTENCE.split(text)
        self.rng.shuffle(sentences)
        words = " ".join(sentences).split()
        # One word in six replaced (at least one): hardly any 16-token run survives ("67-year-old" is
        # 3 tokens), and no short stem stays equal.
        for i in range(self.rng.randrange(min(6, len(words))), len(words), 6):
            words[i] = self.rng.choice(self.words)
        return " ".join(words), options, False

    def table(self, n: int, offset: int) -> tuple[pa.Table, int]:
        """A QUESTION_SCHEMA table of ``n`` questions, and how many are exact copies."""
        texts, options, copies = [], [], 0
        for _ in range(n):
            t, o, c = self.question()
            texts.append(t)
            options.append([{"label": chr(65 + k), "text": x} for k, x in enumerate(o)])
            copies += c
        cols = {
            "question_id": [f"q{offset + i:09d}" for i in range(n)],
            "source": ["bench"] * n,
            "split": ["train"] * n,
            "task_type": ["text_mcq" if o else "open_qa" for o in options],
            "question": texts,
            "options": options,
            "answer": ["x"] * n,
            "images": [[]] * n,
            "input_file": ["synthetic"] * n,
            "record_index": list(range(offset, offset + n)),
        }
        arrays = [pa.array(cols.get(f.name, [None] * n), type=f.type) for f in QUESTION_SCHEMA]
        return pa.Table.from_arrays(arrays, schema=QUESTION_SCHEMA), copies


def bench_scale(work: Path, n: int, repeats: int) -> dict:
    # Index: build time (median), bytes, RSS delta.
    builds, deltas = [], []
    index = None
    for _ in range(repeats):
        index = None
        before = rss_mb()
        t0 = time.perf_counter()
        index = DecontamIndex.from_registry()
        builds.append(time.perf_counter() - t0)
        deltas.append(rss_mb() - before)
    blob = index.to_bytes()
    before = rss_mb()
    t0 = time.perf_counter()
    loaded = DecontamIndex.from_bytes(blob)  # what a shard worker does
    load_s = time.perf_counter() - t0
    load_delta = rss_mb() - before
    del loaded

    # Questions, made once (not timed), kept as Parquet shards so every repeat checks the same data.
    maker = QuestionMaker()
    src = storage.Dataset(str(work / "scale" / "questions"), QUESTION_SCHEMA)
    copies = 0
    tokens_seen = 0
    shard_rows = 50_000
    for shard, lo in enumerate(range(0, n, shard_rows)):
        table, c = maker.table(min(shard_rows, n - lo), lo)
        copies += c
        if shard == 0:
            sample = table.column("question").to_pylist()[:5000]
            tokens_seen = sum(len(tokens(t)) for t in sample) / len(sample)
        src.write_shard(shard, table)

    # Core: check_table over in-memory batches (one process, one core).
    # Wall time and this process's CPU time: on a shared 2-core VM, CPU seconds give the per-core rate.
    core_runs, core_cpu_runs = [], []
    removed_core = 0
    for _ in range(repeats):
        elapsed, cpu, removed_core = 0.0, 0.0, 0
        for batch in src.iter_batches(batch_size=BATCH):
            table = pa.Table.from_batches([batch])
            t0, c0 = time.perf_counter(), time.process_time()
            matches = index.check_table(table)
            elapsed += time.perf_counter() - t0
            cpu += time.process_time() - c0
            removed_core += sum(m is not None for m in matches)
        core_runs.append(n / elapsed)
        core_cpu_runs.append(n / cpu)

    # End to end: decontaminate() over the Parquet shards (read, check, write kept + removed).
    e2e_runs, e2e_cpu_runs = [], []
    result = None
    for r in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        result = decontaminate(src.uri, str(work / "scale" / f"out-{r}"), index=index)
        e2e_runs.append(n / (time.perf_counter() - t0))
        e2e_cpu_runs.append(n / (time.process_time() - c0))
    return {
        "questions": n,
        "avg_tokens_per_question": round(tokens_seen, 1),
        "exact_copies": copies,
        "removed": result.removed,
        "removed_by_check_table": removed_core,
        "by_kind": result.by_kind,
        "index_build_s_median": round(statistics.median(builds), 3),
        "index_array_mb": round(index.nbytes() / 1e6, 1),
        "index_npz_mb": round(len(blob) / 1e6, 1),
        "index_load_s": round(load_s, 3),
        "index_build_rss_delta_mb_median": round(statistics.median(deltas), 1),
        "index_load_rss_delta_mb": round(load_delta, 1),
        "index": repr(index),
        "check_table_q_per_s_median": round(statistics.median(core_runs)),
        "check_table_q_per_s_runs": [round(x) for x in core_runs],
        "check_table_q_per_cpu_s_median": round(statistics.median(core_cpu_runs)),
        "decontaminate_e2e_q_per_s_median": round(statistics.median(e2e_runs)),
        "decontaminate_e2e_q_per_s_runs": [round(x) for x in e2e_runs],
        "decontaminate_e2e_q_per_cpu_s_median": round(statistics.median(e2e_cpu_runs)),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "_child":
        _decontam_child(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000, help="questions in the scale run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    report: dict = {"cpu_count": os.cpu_count(), "python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory(prefix="bench-decontam-") as tmp:
        work = Path(tmp)
        if not args.skip_real:
            report["real_files"] = bench_real(work, args.repeats)
            print(json.dumps({"real_files": report["real_files"]}, indent=2), flush=True)
        if not args.skip_scale:
            report["scale"] = bench_scale(work, args.n, args.repeats)
            print(json.dumps({"scale": report["scale"]}, indent=2), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
