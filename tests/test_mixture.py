"""Mixture: weights, caps, dedupe, seeded shuffle, question-level split, streaming buckets."""

from __future__ import annotations

import pytest

from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.mixture import MixtureConfig, build_mixture, load_result, parse_weights
from tests.support.mixture import accepted_inputs
from tests.support.orchestration import write_inputs


@pytest.fixture
def inputs(shared_data, tmp_path):
    return write_inputs(shared_data, str(tmp_path / "in"), n_text=12, n_image=3)


def _rows(uri: str) -> list[dict]:
    return list(storage.Dataset(uri).iter_rows())


def test_dedupe_split_and_counts(inputs, tmp_path):
    accepted, questions = inputs
    result = build_mixture(accepted, questions, str(tmp_path / "mix"), MixtureConfig(validation_fraction=0.3))
    train, val = _rows(result.train_uri), _rows(result.validation_uri)
    # 15 questions x 3 traces, of which 2 are distinct (variant 0 and 1): 30 rows; the rejected never enter.
    assert len(train) + len(val) == 30
    assert all(r["teacher"] == "sandbox" and r["reasoning"] != "wrong" for r in train + val)
    assert {r["question_id"] for r in train}.isdisjoint({r["question_id"] for r in val})
    assert len(val) > 0 and len(train) > 0
    medqa = result.sources["medqa"]
    assert (medqa.accepted, medqa.duplicates, medqa.selected) == (36, 12, 24)
    assert result.rows_train == len(train) and result.rows_validation == len(val)
    assert load_result(str(tmp_path / "mix")).rows_train == len(train)
    # images travel with the question
    assert all(r["images"] for r in train + val if r["source"] == "vqa_rad")


def test_same_seed_same_order_any_bucket_count(inputs, tmp_path):
    accepted, questions = inputs
    a = build_mixture(accepted, questions, str(tmp_path / "a"), MixtureConfig(seed=7, bucket_rows=10_000))
    b = build_mixture(
        accepted, questions, str(tmp_path / "b"), MixtureConfig(seed=7, bucket_rows=5, shard_rows=4)
    )
    c = build_mixture(accepted, questions, str(tmp_path / "c"), MixtureConfig(seed=8))
    order = lambda res: [(r["question_id"], r["reasoning"]) for r in _rows(res.train_uri)]  # noqa: E731
    assert order(a) == order(b)  # 1 bucket vs many buckets + many shards: same global shuffle
    assert len(storage.Dataset(b.train_uri).manifest()) > 1
    assert order(a) != order(c)
    keys = [r["shuffle_key"] for r in _rows(b.train_uri)]
    assert keys == sorted(keys)  # concatenated shards are in shuffle-key order


def test_weights_and_caps(inputs, tmp_path):
    accepted, questions = inputs
    cfg = MixtureConfig(weights={"vqa_rad": 2.0, "medqa": 0.5}, caps={"medqa": 5}, validation_fraction=0)
    result = build_mixture(accepted, questions, str(tmp_path / "m"), cfg)
    rows = _rows(result.train_uri)
    by_src = {s: [r for r in rows if r["source"] == s] for s in ("medqa", "vqa_rad")}
    assert len(by_src["medqa"]) == 5 and result.sources["medqa"].dropped_by_cap > 0
    assert len(by_src["vqa_rad"]) == 12  # 6 distinct traces, two copies each
    assert sorted({r["copy"] for r in by_src["vqa_rad"]}) == [0, 1]
    per_q = build_mixture(
        accepted,
        questions,
        str(tmp_path / "q"),
        MixtureConfig(max_traces_per_question=1, validation_fraction=0),
    )
    assert per_q.rows_train == 15 and per_q.sources["medqa"].over_question_limit == 12


def test_rerun_replaces_and_bad_config(inputs, tmp_path):
    accepted, questions = inputs
    out = str(tmp_path / "m")
    build_mixture(accepted, questions, out, MixtureConfig(shard_rows=3))
    again = build_mixture(accepted, questions, out, MixtureConfig(shard_rows=100))
    assert len(_rows(again.train_uri)) == again.rows_train  # no stale shards from the first run
    assert not storage.exists(storage.join(out, "_work"))
    with pytest.raises(ConfigError):
        parse_weights(["medqa"])
    with pytest.raises(ValueError):
        MixtureConfig(weights={"medqa": -1})


def test_missing_input_is_one_line_error(tmp_path):
    from octomed_data.errors import StorageError

    with pytest.raises(StorageError, match="not found"):
        build_mixture(str(tmp_path / "nope"), str(tmp_path / "nope2"), str(tmp_path / "m"))


def test_mix_on_s3(inputs, s3_bucket):
    accepted, questions = inputs
    result = build_mixture(accepted, questions, f"{s3_bucket}/mix", MixtureConfig(bucket_rows=10))
    assert result.rows_train + result.rows_validation == 30
    assert len(_rows(result.train_uri)) == result.rows_train


def test_traces_of_removed_questions_never_enter(inputs, tmp_path):
    """A trace whose question decontamination removed (absent from the questions) is dropped."""
    from octomed_data.schema import QUESTION_SCHEMA

    accepted, questions = inputs
    all_questions = _rows(questions)
    removed = {q["question_id"] for q in all_questions if q["source"] == "vqa_rad"}
    kept_uri = str(tmp_path / "kept")
    kept = [q for q in all_questions if q["question_id"] not in removed]
    storage.Dataset(kept_uri, QUESTION_SCHEMA).write_shard(0, kept)
    result = build_mixture(accepted, kept_uri, str(tmp_path / "m"), MixtureConfig(validation_fraction=0.3))
    rows = _rows(result.train_uri) + _rows(result.validation_uri)
    assert rows and not {r["question_id"] for r in rows} & removed
    # 3 removed questions x 2 distinct accepted traces each
    assert result.sources["vqa_rad"].missing_question == 6 and result.sources["vqa_rad"].selected == 0
    assert len(rows) == 24  # the 12 MedQA questions keep their 2 distinct traces each


def test_exclude_audit_flags(inputs, tmp_path):
    """Questions the filter's gold-label audit flags leave the mixture when asked (counted); by default
    the audit is not even read. (The full path, through the filter stage, is in test_audit.py.)"""
    from octomed_data.schema import VERDICT_SCHEMA
    from octomed_data.stats import source_statistics

    accepted, questions = inputs
    root = accepted.rsplit("/", 1)[0]
    acc = storage.Dataset(accepted)
    first = acc.read_shard("00000").to_pylist()
    # two MedQA questions whose traces are all in shard 00000: the teacher says "Z" 10 more times
    counts = {}
    for r in first:
        counts[r["question_id"]] = counts.get(r["question_id"], 0) + 1
    planted = [q for q, n in counts.items() if n == 4][:2]
    verdicts = storage.Dataset(storage.join(root, "verdicts"), VERDICT_SCHEMA)
    for shard in acc.manifest():
        rows = acc.read_shard(shard).to_pylist()
        for r in list(rows):
            if r["question_id"] in planted and r["sample_idx"] == 99:
                rows += [r | {"sample_idx": 100 + k} for k in range(10)]
        for r in rows:
            r.update(reasoning_chars=len(r["reasoning"]), reasoning_words=len(r["reasoning"].split()))
            r["reject_reason"] = None if r["correct"] else "wrong_answer"
        verdicts.write_shard(shard, rows)
    stats = source_statistics(verdicts.uri)
    assert stats["audit"]["sources"]["medqa"]["suspected_label_error"] == 2

    plain = build_mixture(accepted, questions, str(tmp_path / "plain"), MixtureConfig(validation_fraction=0))
    config = MixtureConfig(exclude_audit_flags=["suspected_label_error"], validation_fraction=0)
    result = build_mixture(accepted, questions, str(tmp_path / "m"), config)
    rows = _rows(result.train_uri)
    assert not set(planted) & {r["question_id"] for r in rows}
    medqa = result.sources["medqa"]
    assert (medqa.excluded_by_audit, medqa.questions_excluded_by_audit) == (6, 2)  # 3 accepted traces each
    assert medqa.selected == plain.sources["medqa"].selected - 4  # 2 distinct traces each
    assert result.rows_train == plain.rows_train - 4
    # the default never reads an audit (none at this path)
    again = build_mixture(
        accepted,
        questions,
        str(tmp_path / "d"),
        MixtureConfig(validation_fraction=0),
        audit=str(tmp_path / "x"),
    )
    assert again.rows_train == plain.rows_train and again.sources["medqa"].excluded_by_audit == 0


def test_mixture_and_export_stages_rebuild_only_for_new_inputs_or_settings(shared_data, tmp_path):
    """Global steps have done markers: a pass over a finished run rewrites nothing; a changed
    setting rebuilds that step (and what reads it); a re-committed accepted shard rebuilds both."""
    import shutil
    from pathlib import Path

    from octomed_data.layout import RunPaths
    from octomed_data.stages import LocalExecutor, raise_for_failures, run_stage
    from octomed_data.stages.mixture import ExportStage, MixtureStage

    paths = RunPaths.at(str(tmp_path / "run"))
    accepted, questions = write_inputs(shared_data, paths.stage("filter"), n_text=6, n_image=2)
    shutil.copytree(questions, paths.questions)

    def run_both(mix: MixtureConfig, settings: dict) -> dict[str, str]:
        states = {}
        for stage in (MixtureStage(paths, mix), ExportStage(paths, settings)):
            result = run_stage(stage, LocalExecutor(progress=False))
            raise_for_failures(result)
            states[stage.name] = result.outcomes["all"].state
            assert result.outcomes["all"].counts["uri"] == (
                paths.mixture if stage.name == "mixture" else paths.export
            )
        return states

    def written() -> dict[str, int]:
        roots = (Path(paths.mixture), Path(paths.export))
        return {str(p): p.stat().st_mtime_ns for r in roots for p in r.rglob("*") if p.is_file()}

    completed, reused = (
        {"mixture": "COMPLETED", "export": "COMPLETED"},
        {"mixture": "REUSED", "export": "REUSED"},
    )
    assert run_both(MixtureConfig(), {}) == completed
    before = written()
    assert run_both(MixtureConfig(), {}) == reused
    assert written() == before  # nothing rewritten, not even a marker
    # A changed export setting rebuilds the export alone; a changed mixture setting, both.
    assert run_both(MixtureConfig(), {"answer_format": "as_is"}) == {
        "mixture": "REUSED",
        "export": "COMPLETED",
    }
    assert run_both(MixtureConfig(seed=3), {"answer_format": "as_is"}) == completed
    assert run_both(MixtureConfig(seed=3), {"answer_format": "as_is"}) == reused
    # A re-filtered shard (accepted committed again) rebuilds the mixture, then the export.
    ds = storage.Dataset(accepted)
    ds.write_shard("00000", ds.read_shard("00000"))
    before = written()
    assert run_both(MixtureConfig(seed=3), {"answer_format": "as_is"}) == completed
    after = written()
    train = [p for p in before if "/mixture/train/" in p]
    assert train and all(after.get(p, 0) > before[p] for p in train if p in after)
    assert load_result(paths.mixture).rows_train == storage.Dataset(paths.mixture_train).num_rows()
    # Another run's questions (a lab arm reads its base run's): a re-committed questions shard rebuilds.
    arm = RunPaths.at(str(tmp_path / "arm"))
    shutil.copytree(accepted, arm.accepted)

    def arm_state() -> str:
        result = run_stage(
            MixtureStage(arm, MixtureConfig(), questions=questions), LocalExecutor(progress=False)
        )
        raise_for_failures(result)
        return result.outcomes["all"].state

    assert (arm_state(), arm_state()) == ("COMPLETED", "REUSED")
    qs = storage.Dataset(questions)
    qs.write_shard("00000", qs.read_shard("00000"))
    assert (arm_state(), arm_state()) == ("COMPLETED", "REUSED")
    direct = build_mixture(accepted, questions, str(tmp_path / "direct"), MixtureConfig())
    assert _rows(arm.mixture_train) == _rows(direct.train_uri)  # the stage builds what build_mixture does


def _long_inputs(root: str, n_questions: int, samples: int, words: int) -> tuple[str, str]:
    """Questions with ``samples`` accepted traces of ~``words`` words each (R1-length when large)."""
    filler = " ".join(f"finding{i % 97}" for i in range(words))
    return accepted_inputs(root, n_questions, samples, lambda i, k: f"{filler} {k}", rows_per_shard=500)


def _python_peak(fn) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_is_bounded_in_bytes_not_rows(tmp_path):
    """Issue 26: 3x the (long) traces with the same memory_mb keep the Python peak flat, and the
    rows and their order do not depend on memory_mb. With the old row bound (50,000 samples per
    bucket) all 2,700 traces (~9 MB of text) were one bucket held as dicts."""
    small = _long_inputs(str(tmp_path / "small"), 150, 6, 500)
    large = _long_inputs(str(tmp_path / "large"), 450, 6, 500)
    cfg = MixtureConfig(memory_mb=8, validation_fraction=0.1)
    peak_small = _python_peak(lambda: build_mixture(*small, str(tmp_path / "ms"), cfg))
    peak_large = _python_peak(lambda: build_mixture(*large, str(tmp_path / "ml"), cfg))
    text_large = 450 * 6 * len(" ".join(f"finding{i % 97}" for i in range(500)))
    assert peak_large < 1.3 * peak_small, (peak_small, peak_large)
    assert peak_large < text_large, (peak_large, text_large)  # never the whole input at once
    roomy = build_mixture(
        *large, str(tmp_path / "roomy"), MixtureConfig(memory_mb=1024, validation_fraction=0.1)
    )
    tight = load_result(str(tmp_path / "ml"))
    order = lambda uri: [(r["question_id"], r["reasoning"][-3:]) for r in _rows(uri)]  # noqa: E731
    assert (
        order(roomy.train_uri) == order(tight.train_uri) and len(order(roomy.train_uri)) == tight.rows_train
    )
    assert len(storage.Dataset(tight.train_uri).manifest()) > len(storage.Dataset(roomy.train_uri).manifest())


def test_export_stage_refuses_the_key_of_any_teacher_the_run_names(shared_data, tmp_path, monkeypatch):
    """Issue 25: the export's key scan uses each teacher's key variable from the run's recipe, not
    only OPENAI_API_KEY; the refusal is one line that names the variable, never the key."""
    from octomed_data.recipe import load_recipe
    from octomed_data.runs import start_run
    from octomed_data.schema import ACCEPTED_SCHEMA
    from octomed_data.stages import LocalExecutor, run_stage
    from octomed_data.stages.mixture import ExportStage, MixtureStage

    demo = load_recipe("demo")
    teacher = demo.teachers[0].model_copy(update={"api_key_env": "R1_TEACHER_KEY"})
    recipe = demo.model_copy(update={"teachers": [teacher]})
    paths = start_run(recipe, "keys", str(tmp_path / "store"))
    accepted, questions = write_inputs(shared_data, str(tmp_path / "in"), n_text=4, n_image=0)
    key = "sk-r1-teacher-0123456789abcdef"
    monkeypatch.setenv("R1_TEACHER_KEY", key)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    rows = _rows(accepted)
    rows[0]["reasoning"] += f" (the header said Bearer {key})"
    storage.Dataset(paths.accepted, ACCEPTED_SCHEMA).write_shard("00000", rows)
    storage.Dataset(paths.questions, storage.Dataset(questions).read_all().schema).write_shard(
        "00000", storage.Dataset(questions).read_all()
    )
    assert "R1_TEACHER_KEY" in ExportStage(paths).secret_env()
    assert run_stage(MixtureStage(paths), LocalExecutor(progress=False)).outcomes["all"].state == "COMPLETED"
    outcome = run_stage(ExportStage(paths), LocalExecutor(progress=False)).outcomes["all"]
    assert outcome.state == "FAILED" and "$R1_TEACHER_KEY" in outcome.error and key not in outcome.error


def test_shuffle_spill_chunks_do_not_grow_with_output_shards(tmp_path, monkeypatch):
    """Issue 26: the shuffle spills into ranges bounded by bytes alone and cuts each sorted range into
    its output shards, so many small output shards (shard_rows) add no spill chunks: the chunks had
    grown with rows x rows (one per output shard per spill flush). Same rows, same order."""
    inputs = _long_inputs(str(tmp_path / "in"), 150, 6, 500)
    chunks = {"n": 0}
    write = storage.Dataset.write_shard

    def counted(self, *args, **kwargs):
        if "/_work/" in self.uri and "shuffle" in self.uri:
            chunks["n"] += 1
        return write(self, *args, **kwargs)

    monkeypatch.setattr(storage.Dataset, "write_shard", counted)
    built = {}
    for rows in (5000, 5):
        chunks["n"] = 0
        cfg = MixtureConfig(memory_mb=8, validation_fraction=0.1, shard_rows=rows)
        built[rows] = (build_mixture(*inputs, str(tmp_path / f"m{rows}"), cfg), chunks["n"])
    (wide, wide_chunks), (narrow, narrow_chunks) = built[5000], built[5]
    shards = lambda res: len(storage.Dataset(res.train_uri).manifest())  # noqa: E731
    assert shards(narrow) >= wide.rows_train // 5 > 10 * shards(wide)
    assert narrow_chunks == wide_chunks, (narrow_chunks, wide_chunks)
    order = lambda res: [(r["question_id"], r["shuffle_key"]) for r in _rows(res.train_uri)]  # noqa: E731
    assert order(narrow) == order(wide) and len(order(wide)) == wide.rows_train
    keys = [k for _, k in order(narrow)]
    assert keys == sorted(keys)
    for name in storage.Dataset(narrow.train_uri).manifest():  # each shard holds its own key range
        part = [r["shuffle_key"] for r in storage.Dataset(narrow.train_uri).read_shard(name).to_pylist()]
        assert all(k * shards(narrow) // 2**64 == int(name) for k in part)


def _partition_chunks(n_rows: int, tmp_path, name: str, read_back: bool = True) -> tuple[int, dict]:
    """Partition ``n_rows`` ~350-byte rows into one hash bucket per 100 rows (a bucket ~2x the buffer,
    as the mixture sizes them) through a 16 KB buffer; (work shards written, bucket -> its rows)."""
    import numpy as np
    import pyarrow as pa

    from octomed_data.mixture_partition import Partition
    from octomed_data.mixture_select import h64

    schema = pa.schema([("n", pa.int64()), ("text", pa.string())])
    n_buckets = n_rows // 100
    bucket_of = lambda t: np.array([h64("b", n) % n_buckets for n in t.column("n").to_pylist()])  # noqa: E731
    part = Partition(str(tmp_path / name), schema, n_buckets, 16 * 2**10, bucket_of)
    for n in range(n_rows):
        part.add(h64("b", n) % n_buckets, {"n": n, "text": "x" * 100})
    shards = part.finish()
    if not read_back:
        return part.chunks_written, {}
    got = {
        b: [r["n"] for r in storage.Dataset(part.uri).iter_rows(shards=names)] for b, names in shards.items()
    }
    return part.chunks_written, got


def test_partition_chunks_grow_linearly_with_rows(tmp_path, monkeypatch):
    """Issue 26: the mixture's spills partition with a bounded fan-out (4 buckets a pass here),
    level by level, so the work shards grow with the rows times the levels (log_4 of the buckets):
    1x, 3x, 9x the rows and buckets (8, 24, 72: 2, 3, 4 levels) write at most ~2x the chunks per
    row. One pass into every bucket (the fan-out unbounded, as before) writes one chunk per bucket
    per buffer flush: chunks per row grow with the rows (~3x from 1x to 3x). Every bucket gets
    its rows in the order they came."""
    from octomed_data import mixture_partition

    monkeypatch.setattr(mixture_partition, "MIN_CHUNK_BYTES", 4 * 2**10)  # fan-out 4
    sizes = (800, 2400, 7200)
    leveled = {n: _partition_chunks(n, tmp_path, f"l{n}") for n in sizes}
    per_row = [leveled[n][0] / n for n in sizes]
    assert per_row[2] < 2.2 * per_row[0], per_row
    for n in sizes:
        assert sorted(x for rows in leveled[n][1].values() for x in rows) == list(range(n))
        assert all(rows == sorted(rows) for rows in leveled[n][1].values())  # rows keep their order
    monkeypatch.setattr(mixture_partition, "MIN_CHUNK_BYTES", 1)  # one pass into every bucket
    one_pass_800 = _partition_chunks(800, tmp_path, "o800")
    assert one_pass_800[1] == leveled[800][1]  # the same buckets, the same rows, the same order

    def count_only(self, shard, data, extra=None):  # a single pass reads nothing back
        return None

    monkeypatch.setattr(storage.Dataset, "write_shard", count_only)
    one_pass_7200 = _partition_chunks(7200, tmp_path, "o7200", read_back=False)[0]
    assert one_pass_7200 / 7200 > 3.5 * one_pass_800[0] / 800, (one_pass_800[0], one_pass_7200)
    assert one_pass_7200 > 2 * leveled[7200][0], (one_pass_7200, leveled[7200][0])


def test_multi_level_spills_write_the_same_mixture(tmp_path, monkeypatch):
    """Issue 26: a mixture whose spills take several levels (fan-out 2) writes the same output
    shards, byte for byte, and the same counts as one pass into every bucket."""
    import hashlib

    from octomed_data import mixture_partition

    inputs = _long_inputs(str(tmp_path / "in"), 300, 6, 300)
    cfg = MixtureConfig(memory_mb=8, validation_fraction=0.2, caps={"src0": 400}, weights={"src1": 1.5})
    levels: list[int] = []
    finish = mixture_partition.Partition.finish
    monkeypatch.setattr(
        mixture_partition.Partition, "finish", lambda self: (levels.append(self.levels), finish(self))[1]
    )
    built = {}
    for name, min_chunk in (("leveled", mixture_partition.MIN_CHUNK_BYTES), ("one_pass", 1)):
        monkeypatch.setattr(mixture_partition, "MIN_CHUNK_BYTES", min_chunk)
        built[name] = build_mixture(*inputs, str(tmp_path / name), cfg)
    assert max(levels) >= 2 and set(levels[4:]) == {1}  # several levels, then one pass each

    def digests(res):
        out = {}
        for uri in (res.train_uri, res.validation_uri):
            ds = storage.Dataset(uri)
            for shard in ds.manifest():
                with open(ds.file_uri(shard), "rb") as fh:
                    out[(uri.rsplit("/", 1)[-1], shard)] = hashlib.sha256(fh.read()).hexdigest()
        return out

    a, b = built["leveled"], built["one_pass"]
    assert digests(a) == digests(b) and len(digests(a)) > 4
    paths = {"seconds": 0, "uri": "", "train_uri": "", "validation_uri": ""}
    assert {**a.to_dict(), **paths} == {**b.to_dict(), **paths}
