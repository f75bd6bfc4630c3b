"""kill -9 of ``octomed-data ingest`` and ``octomed-data distill`` at random moments, again and again:
``pyarrow.dataset`` and ``datasets`` on every output folder count exactly the rows the markers commit
after every kill, and a final complete run leaves every row exactly once (issue 25)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq

from octomed_data.sandbox import start_sandbox
from tests.support.distill import make_questions

KEY = "sk-test-kill-reads-7c1e0d2a"
ROOT = str(Path(__file__).resolve().parents[2])
INGEST_KILLS, DISTILL_KILLS = 5, 5  # at least 10 kills in all, the two commands side by side
SHARDS, PER_SHARD, SAMPLES = 12, 8, 2  # enough shards that 5 kills each still find work left


def _folders(root: Path) -> list[Path]:
    """Every output dataset folder under ``root`` (a folder with a ``_manifest``)."""
    return sorted(m.parent for m in root.rglob("_manifest") if m.is_dir())


def _committed(folder: Path) -> dict[str, int]:
    """file -> rows of the committed shards: each marker that names a file that exists."""
    out = {}
    for marker in (folder / "_manifest").glob("*.json"):
        info = json.loads(marker.read_text())
        if (folder / info["file"]).exists():
            out[info["file"]] = info["rows"]
    return out


def _check_readers(root: Path, when: str) -> dict[str, int]:
    """pyarrow.dataset and the files ``datasets.load_dataset(data_files=<folder>/*.parquet)``
    resolves count exactly the committed rows in every output folder; returns rows per folder."""
    from datasets.data_files import resolve_pattern

    counts = {}
    for folder in _folders(root):
        committed = _committed(folder)
        seen = pads.dataset(str(folder), format="parquet").count_rows()
        try:
            files = resolve_pattern(f"{folder}/*.parquet", base_path="")
        except FileNotFoundError:  # no file at all (killed inside its first commit): what a reader finds
            files = []
        hf = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        names = sorted(Path(f).name for f in files)
        assert seen == hf == sum(committed.values()), f"{when}: {folder}: {seen}/{hf} vs {committed}"
        assert names == sorted(committed), f"{when}: {folder}: {names} vs {sorted(committed)}"
        counts[str(folder.relative_to(root))] = seen
    return counts


def _shards(folder: Path) -> set[str]:
    return {Path(info).stem.split("-", 1)[-1] for info in _committed(folder)}


def _writes_since(root: Path, t0: float, pattern: str) -> int:
    n = 0
    for m in root.rglob(pattern):
        try:
            n += m.stat().st_mtime >= t0
        except FileNotFoundError:
            pass
    return n


def _kill_loop(cmd: list[str], root: Path, kills: int, rng: random.Random, log: Path, results: dict) -> None:
    """Start ``cmd`` and kill its process group at a random moment, ``kills`` times, checking the
    readers after each; then run it whole. The moment: just after a random one of its first
    commits (0-30 ms later: often inside the next one), or a random time once it writes."""
    # Shard leases of 2 s: a killed run's lease expires before the next run waits long for it.
    env = {**os.environ, "OPENAI_API_KEY": KEY, "PYTHONPATH": ROOT, "OCTOMED_SHARD_LEASE_TTL_S": "2"}
    done = 0
    for attempt in range(kills + 4):
        if done == kills:
            break
        with open(log, "ab") as out:
            t0 = time.time()
            proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            deadline = time.monotonic() + 60
            if attempt % 2:  # a random time once it has started writing (its first attempt record)
                while (
                    proc.poll() is None
                    and time.monotonic() < deadline
                    and not _writes_since(root, t0, "state/*/*.json")
                ):
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 1.0))
            else:  # just after a random commit
                target = rng.randint(1, 3)
                while (
                    proc.poll() is None
                    and time.monotonic() < deadline
                    and _writes_since(root, t0, "_manifest/*.json") < target
                ):
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.03))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                done += 1
            proc.wait()
        when = f"after kill {done} of {cmd[3]} (OCTOMED_KILL_SEED={results['seed']})"
        results.setdefault("checked", []).append(_check_readers(root, when))
        # What the kill cut short (printed: the readers were checked beside half-done writes).
        halfway = [p.name for p in root.rglob("*.tmp")] + [
            m.name
            for f in _folders(root)
            for m in (f / "_manifest").glob("*.json")
            if m.stem not in _shards(f)
        ]
        results.setdefault("halfway", []).append(len(halfway))
        results.setdefault("seconds", []).append(round(time.time() - t0, 1))
    results["kills"] = done
    t0 = time.time()
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    results["final"] = final
    results["seconds"].append(round(time.time() - t0, 1))


def test_readers_see_only_committed_rows_through_repeated_kill_9(shared_data: Path, tmp_path: Path) -> None:
    seed = int(os.environ.get("OCTOMED_KILL_SEED") or random.randrange(2**31))  # set it to replay a failure
    print(f"OCTOMED_KILL_SEED={seed}")
    source = shared_data / "medqa" / "medqa_input.head200.jsonl"
    ingest_out = tmp_path / "ingested"
    ingest = [sys.executable, "-m", "cli", "ingest", "medqa", str(source), "--out", str(ingest_out)]
    ingest += ["--shard-size", "10", "--no-progress"]
    q_uri, distill_out = str(tmp_path / "q"), tmp_path / "distilled"
    for s in range(SHARDS):
        make_questions(q_uri, PER_SHARD, shard=f"{s:05d}", offset=PER_SHARD * s)
    loader = threading.Thread(target=lambda: __import__("datasets"))  # its import takes seconds
    loader.start()
    with start_sandbox(latency_s=0.05) as sb:  # each run lasts long enough to be killed
        distill = [sys.executable, "-m", "cli", "distill", q_uri, "--base-url", sb.base_url]
        distill += ["--model", "sandbox-r1", "--teacher-name", "sandbox", "--samples", str(SAMPLES)]
        distill += ["--max-in-flight", "4", "--executor", "local", "--out", str(distill_out), "--no-progress"]
        loader.join()
        a: dict = {"seed": seed}
        b: dict = {"seed": seed}
        loops = [
            threading.Thread(
                target=_kill_loop,
                args=(ingest, ingest_out, INGEST_KILLS, random.Random(seed), tmp_path / "i.log", a),
            ),
            threading.Thread(
                target=_kill_loop,
                args=(distill, distill_out, DISTILL_KILLS, random.Random(seed + 1), tmp_path / "d.log", b),
            ),
        ]
        for t in loops:
            t.start()
        for t in loops:
            t.join()
    for results in (a, b):
        assert "final" in results, "a kill loop failed: see the assertion above"
        assert results["final"].returncode == 0, (
            results["final"].stdout[-2000:] + results["final"].stderr[-2000:]
        )
    print("seconds per ingest run:", a["seconds"], "per distill run:", b["seconds"])
    print("unfinished writes left by each kill: ingest", a["halfway"], "distill", b["halfway"])
    assert a["kills"] + b["kills"] >= 10 and a["kills"] >= 4 and b["kills"] >= 4, (a["kills"], b["kills"])
    assert any(sum(c.values()) for c in a["checked"]) and any(sum(c.values()) for c in b["checked"])

    # The final complete runs: every row exactly once, and the readers agree with the markers.
    import datasets

    counts = {**_check_readers(ingest_out, "final ingest"), **_check_readers(distill_out, "final distill")}
    for folder in _folders(ingest_out) + _folders(distill_out):
        if not _committed(folder):
            continue
        hf = datasets.load_dataset(
            "parquet", data_files=f"{folder}/*.parquet", split="train", cache_dir=str(tmp_path / "hf")
        )
        assert hf.num_rows == sum(_committed(folder).values()), folder
    records = sum(1 for line in source.read_text().splitlines() if line.strip())
    questions = pads.dataset(str(ingest_out / "questions"), format="parquet").to_table(
        columns=["question_id"]
    )
    ids = Counter(questions.column("question_id").to_pylist())
    assert len(ids) == counts["questions"] == records - counts.get("quarantine", 0) and set(ids.values()) == {
        1
    }
    raw = pads.dataset(str(distill_out / "raw"), format="parquet").to_table(
        columns=["question_id", "sample_idx"]
    )
    keys = Counter(
        zip(raw.column("question_id").to_pylist(), raw.column("sample_idx").to_pylist(), strict=True)
    )
    assert len(keys) == SHARDS * PER_SHARD * SAMPLES == counts["raw"] and set(keys.values()) == {1}
    assert counts["verdicts"] == counts["raw"]
    # Nothing the killed writers left stays behind: no temp file, no file without its marker.
    for root in (ingest_out, distill_out):
        assert not [p for p in root.rglob("*.tmp")], sorted(p.name for p in root.rglob("*.tmp"))


class _Cut(BaseException):
    """A kill -9 between a commit's marker and its file."""


def test_s3_readers_see_only_committed_rows_when_a_commit_is_cut_short(s3_bucket, monkeypatch) -> None:
    """On an object store too: the marker goes first, the one PUT of the file is the commit point;
    the next writer of the shard and the next pass clear a marker-less file of older versions."""
    import pyarrow as pa

    from octomed_data import storage
    from octomed_data.storage import dataset as dataset_module

    schema = pa.schema([("x", pa.int64())])
    ds = storage.Dataset(f"{s3_bucket}/d", schema)
    fs, path = storage.filesystem(ds.uri)

    def seen() -> int:
        fs.invalidate_cache()
        return pads.dataset(path, filesystem=fs, format="parquet").count_rows()

    ds.write_shard("00000", [{"x": i} for i in range(30)])
    ds.write_shard("00001", [{"x": i} for i in range(20)])
    real = dataset_module.write_json

    def cut(uri: str, obj: object) -> None:
        real(uri, obj)
        raise _Cut

    monkeypatch.setattr(dataset_module, "write_json", cut)
    writer = ds.writer("00001")
    writer.add({"x": 99})
    try:
        writer.commit()
    except _Cut:
        pass
    monkeypatch.undo()
    writer.abort()
    assert seen() == ds.num_rows() == 30 and ds.shard_info("00001") is None
    # A marker-less file (what a kill -9 left with older versions) goes with the next pass.
    with fs.open(f"{path}/part-00002.parquet", "wb") as fh:
        pq.write_table(pa.table({"x": [1, 2, 3]}), fh)
    assert seen() == 33
    ds.drop_stale(keep=["00000", "00001"])
    assert seen() == ds.num_rows() == 30
    ds.write_shard("00001", [{"x": 1}])
    assert seen() == ds.num_rows() == 31
