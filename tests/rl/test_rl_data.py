"""The RL data (issue 27): prompts with gold answers by pass rate, never a benchmark item, the SFT prompt."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from octomed_data import storage
from octomed_data.decontam.index import DecontamIndex
from octomed_data.errors import ConfigError
from octomed_data.export_turns import prepare
from octomed_data.layout import RLFolder, RunPaths
from octomed_data.recipe import Recipe, load_recipe
from octomed_data.rl import RLOptions
from octomed_data.rl.data import RL_SCHEMA, build_rl_data
from octomed_data.schema import QUESTION_SCHEMA, VERDICT_SCHEMA
from octomed_data.stages import LocalExecutor, raise_for_failures, run_stage
from octomed_data.stages.rl_data import RLDataStage
from tests.support.release import build_run
from tests.support.rl import (
    benchmark_questions,
    image_question,
    text_question,
    verdict_rows,
    write_rl_run,
)


@pytest.fixture(scope="module")
def index() -> DecontamIndex:
    return DecontamIndex.from_registry()  # the bundled registry, as a run's default


def rows_of(paths: RunPaths) -> dict[str, dict]:
    folder = RLFolder(paths.rl)
    out = {}
    for split in ("train", "validation"):
        ds = storage.Dataset(folder.split(split), RL_SCHEMA)
        for r in ds.read_all().to_pylist() if ds.manifest() else []:
            assert r["split"] == split and r["question_id"] not in out
            out[r["question_id"]] = r
    return out


@pytest.fixture
def banded(tmp_path, shared_data):
    """Two shards: pass rates 0, 1/4, 1/2, 3/4, 1, unjudged; two real MedQA test items with
    pass rate 1/2; image questions with 1/2; one question decontamination removed (1/2)."""
    paths = RunPaths.at(str(tmp_path / "run"))
    t = [text_question(i) for i in range(8)]
    bench = benchmark_questions(shared_data, 2)
    img = [image_question(i, str(tmp_path / "store")) for i in range(3)]
    gone = text_question(50)
    shard0 = [(t[0], 4, 0), (t[1], 4, 1), (t[2], 4, 2), (t[3], 4, 3), (t[4], 4, 4), (bench[0], 4, 2)]
    shard1 = [(t[5], 0, 0), (t[6], 16, 8), (t[7], 16, 15), (bench[1], 16, 8), *[(q, 2, 1) for q in img]]
    write_rl_run(paths, [shard0, shard1 + [(gone, 4, 2)]], removed=[gone], failed=1)
    # `gone` is in the removed set: a question decontamination removed never reaches RL even when
    # its row is (wrongly) still among the questions.
    return paths, {"t": t, "bench": bench, "img": img, "gone": gone}


def test_rl_data_excludes_benchmark_items_and_questions_outside_the_band(banded, index):
    paths, q = banded
    summary = build_rl_data(paths, RLOptions(validation_fraction=0.3), index=index)
    got = rows_of(paths)
    t, img = q["t"], q["img"]
    want = [t[1], t[2], t[3], t[6], t[7], *img]
    assert set(got) == {x["question_id"] for x in want}
    # The benchmark items had pass rates inside the band: the registry alone left them out.
    assert all(b["question_id"] not in got for b in q["bench"])
    assert q["gone"]["question_id"] not in got
    # Nothing selected is a registry match (the release's check on the written questions).
    table = storage.Dataset(paths.questions, QUESTION_SCHEMA).read_all()
    matched = {
        r["question_id"] for r, m in zip(table.to_pylist(), index.check_table(table), strict=True) if m
    }
    assert matched == {b["question_id"] for b in q["bench"]} and not matched & set(got)
    totals = summary["totals"]
    assert totals["benchmark_excluded"] == 2 and totals["decontam_removed"] == 1
    assert totals["out_of_band"] == 2 and totals["unjudged"] == 1 and totals["selected"] == 8
    assert totals["train"] + totals["validation"] == 8 and totals["validation"] >= 1
    assert (totals["text"], totals["image"]) == (5, 3)
    assert summary["per_source"]["medqa_train_copy"]["benchmark_excluded"] == 2
    assert storage.read_json(RLFolder(paths.rl).data_summary) == summary
    # Pass rate = accepted / judged, failed requests excluded (each question has one failed request).
    assert got[t[2]["question_id"]]["pass_rate"] == 0.5 and got[t[2]["question_id"]]["samples"] == 4
    assert got[t[7]["question_id"]]["pass_rate"] == 15 / 16


def test_band_ends_are_excluded_by_default_and_included_on_request(banded, index):
    paths, q = banded
    build_rl_data(paths, RLOptions(inclusive=True), index=index)
    t = q["t"]
    got = set(rows_of(paths))
    assert {t[0]["question_id"], t[4]["question_id"]} <= got  # 0 and 1 now inside
    assert t[5]["question_id"] not in got  # unjudged: no pass rate
    build_rl_data(paths, RLOptions(pass_rate_min=0.5, pass_rate_max=0.8, inclusive=True), index=index)
    assert set(rows_of(paths)) == {
        x["question_id"] for x in (t[2], t[3], t[6], *q["img"])
    }  # 1/2, 3/4, 8/16 and the images' 1/2; no file left of the earlier build's other shard rows
    with pytest.raises(ValueError, match="empty"):
        RLOptions(pass_rate_min=0.5, pass_rate_max=0.5)


def test_prompts_are_the_sft_students(banded, index):
    """System and user turn exactly as the export writes them for SFT; images as store URIs."""
    paths, q = banded
    build_rl_data(paths, RLOptions(), index=index)
    got = rows_of(paths)
    for question in (q["t"][2], q["img"][0]):
        row = got[question["question_id"]]
        sft = prepare(question | {"response": f"Final answer: \\boxed{{{question['answer']}}}",
                                  "reasoning": "r", "extracted_answer": question["answer"]})  # fmt: skip
        assert row["prompt"] == [
            {"role": "system", "content": sft.system},
            {"role": "user", "content": sft.user},
        ]
        assert row["images"] == [im["uri"] for im in question["images"]]
        assert row["gold_answer"] == question["answer"] and row["options"] == question["options"]
    assert "<image>" not in got[q["img"][0]["question_id"]]["prompt"][1]["content"]  # escaped, as in SFT
    assert all(storage.exists(u) for r in got.values() for u in r["images"])


def test_weights_split_and_cap_are_seeded_and_by_question(tmp_path, index):
    paths = RunPaths.at(str(tmp_path / "run"))
    a = [text_question(i, "src_a") for i in range(40)]
    b = [text_question(100 + i, "src_b") for i in range(40)]
    write_rl_run(paths, [[(x, 4, 2) for x in a], [(x, 4, 1) for x in b]])
    opts = RLOptions(weights={"src_a": 0.25}, validation_fraction=0.25, seed=3)
    first = build_rl_data(paths, opts, index=index)
    rows = rows_of(paths)
    per = Counter(r["source"] for r in rows.values())
    assert per["src_b"] == 40 and 3 <= per["src_a"] <= 20  # a quarter of 40, seeded
    assert first["per_source"]["src_a"]["weighted_out"] == 40 - per["src_a"]
    splits = {k: r["split"] for k, r in rows.items()}
    assert 5 <= sum(s == "validation" for s in splits.values()) <= 40
    again = build_rl_data(paths, opts, index=index)
    assert again == first and {k: r["split"] for k, r in rows_of(paths).items()} == splits
    other = build_rl_data(paths, opts.model_copy(update={"seed": 4}), index=index)
    assert other["totals"]["selected"] != first["totals"]["selected"] or set(rows_of(paths)) != set(rows)
    capped = build_rl_data(paths, opts.model_copy(update={"max_prompts": 7}), index=index)
    assert len(rows_of(paths)) == 7 and capped["totals"]["capped"] == first["totals"]["selected"] - 7
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
        RLOptions(weights={"src_a": 2.0})


def test_no_prompt_left_and_no_verdicts_are_one_line_errors(tmp_path, index):
    paths = RunPaths.at(str(tmp_path / "run"))
    write_rl_run(paths, [[(text_question(i), 4, 4) for i in range(3)]])
    with pytest.raises(
        ConfigError, match=r"no question is left for RL \(3 read: 3 outside the pass-rate band"
    ):
        build_rl_data(paths, RLOptions(), index=index)
    storage.Dataset(paths.questions, QUESTION_SCHEMA).write_shard(1, [text_question(9)])
    with pytest.raises(ConfigError, match=r"without verdicts \(00001\): run the filter stage first"):
        build_rl_data(paths, RLOptions(), index=index)


def test_rl_data_stage_skips_on_a_second_pass_and_rebuilds_on_new_verdicts(tmp_path, shared_data):
    paths = RunPaths.at(str(tmp_path / "run"))
    t = [text_question(i) for i in range(4)]
    img = [image_question(i, str(tmp_path / "store")) for i in range(2)]
    bench = benchmark_questions(shared_data, 1)
    write_rl_run(paths, [[(x, 4, 2) for x in (*t, *bench)], [(x, 4, 1) for x in img]])
    stage = RLDataStage(paths, RLOptions(validation_fraction=0.0))

    def one_pass() -> str:
        result = run_stage(stage, LocalExecutor())
        raise_for_failures(result)
        return result.outcomes["all"].state

    assert one_pass() == "COMPLETED"
    rows = rows_of(paths)
    assert Counter("image" if r["images"] else "text" for r in rows.values()) == {"text": 4, "image": 2}
    assert bench[0]["question_id"] not in rows
    mtime = storage.Dataset(RLFolder(paths.rl).split("train")).manifest()
    assert one_pass() == "REUSED"  # nothing changed: nothing rebuilt
    assert storage.Dataset(RLFolder(paths.rl).split("train")).manifest() == mtime
    # A re-filtered shard (every sample of t[0] now correct) rebuilds, and t[0] leaves the band.
    rows1 = [r for x in t for r in verdict_rows(x, 4, 4 if x is t[0] else 2)]
    rows1 += verdict_rows(bench[0], 4, 2)
    storage.Dataset(paths.verdicts, VERDICT_SCHEMA).write_shard(0, rows1)
    assert one_pass() == "COMPLETED"
    assert t[0]["question_id"] not in rows_of(paths) and len(rows_of(paths)) == 5
    assert one_pass() == "REUSED"
    # Other settings rebuild; the trainer's settings and the format reward do not.
    assert RLDataStage(paths, RLOptions(validation_fraction=0.0, format_reward=1.0)).is_done("all")
    assert not RLDataStage(paths, RLOptions(validation_fraction=0.0, seed=1)).is_done("all")


def test_the_recipe_has_an_rl_block_off_by_default():
    assert Recipe().rl == RLOptions() and not Recipe().rl.enabled
    recipe = load_recipe("demo", overrides={"rl": {"enabled": True, "trainer": {"max_steps": 3}}})
    assert recipe.rl.enabled and recipe.rl.trainer.max_steps == 3
    with pytest.raises(ConfigError, match="rl"):
        load_recipe("demo", overrides={"rl": {"pass_rate_band": [0, 1]}})


def test_rl_data_of_a_distilled_and_filtered_run_without_decontamination(tmp_path):
    """The demo's sources plus real MedQA test items, ingested, NOT decontaminated, distilled by the
    sandbox and filtered: the RL data holds no registry match, and its pass rates are the filter's."""
    medqa = Path(__file__).parents[2] / "octomed_data" / "sample_data" / "medqa"
    entry = {
        "format": "medqa",
        "input": str(medqa / "phrases_no_exclude_test.head8.jsonl"),
        "name": "medqa_test",
    }
    paths = build_run(tmp_path / "store", [entry], decontam=False)
    result = run_stage(RLDataStage(paths, RLOptions(inclusive=True)), LocalExecutor())
    raise_for_failures(result)
    summary = storage.read_json(RLFolder(paths.rl).data_summary)
    # The 8 MedQA test items (source ``medqa``; the demo's other benchmark items too) are left out.
    assert summary["per_source"]["medqa"]["benchmark_excluded"] == 8
    assert summary["per_source"]["medqa"]["selected"] == 0
    got = rows_of(paths)
    questions = storage.Dataset(paths.questions, QUESTION_SCHEMA).read_all()
    index = DecontamIndex.from_registry()
    matched = {
        r["question_id"]
        for r, m in zip(questions.to_pylist(), index.check_table(questions), strict=True)
        if m
    }
    assert len(matched) >= 8 and not matched & set(got)
    verdicts = storage.Dataset(paths.verdicts, VERDICT_SCHEMA).read_all().to_pylist()
    judged, ok = Counter(), Counter()
    for v in verdicts:
        if v["reject_reason"] != "request_failed":
            judged[v["question_id"]] += 1
            ok[v["question_id"]] += v["correct"]
    assert got and all(
        r["pass_rate"] == ok[q] / judged[q] and r["samples"] == judged[q] for q, r in got.items()
    )
    assert {bool(r["images"]) for r in got.values()} == {True, False}  # text and image prompts
    assert run_stage(RLDataStage(paths, RLOptions(inclusive=True))).outcomes["all"].state == "REUSED"
