"""Re-judging a finished run with new ``verify:`` settings, without distilling again.

The run (real PathVQA textbook pairs, MIT; teacher = a sandbox the test owns) is filtered with
exact match; ``octomed-data refilter`` then judges it again with other settings: every filter shard
is re-committed under the new fingerprint, the verdicts change as the new verifier decides, the
teacher gets ZERO distillation requests (counted at the sandbox), the judge is asked only what its
journal lacks, and ``filter/verify_history.jsonl`` plus ``run.json`` record the settings in turn."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from cli import main
from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.layout import RunPaths
from octomed_data.recipe import parse_recipe
from octomed_data.rejection import read_verify_history
from octomed_data.runs import change_verify, open_run
from octomed_data.sandbox import FaultConfig, start_sandbox
from octomed_data.schema import ACCEPTED_SCHEMA
from octomed_data.stages import LocalExecutor, raise_for_failures, run_stage
from octomed_data.stages.filter import FilterStage
from octomed_data.stages.mixture import ExportStage, MixtureStage
from octomed_data.verify import VerifySettings
from tests.support.rejudge import (
    JUDGE,
    KEY_ENV,
    build_run,
    copy_run,
    markers,
    requests_by_kind,
    verdicts,
    write_recipe,
)


@pytest.fixture(scope="module")
def sandbox():
    saved = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = "sk-rejudge-test"
    # The sandbox judge errs on 30% of its keys (seeded): re-judging flips some verdicts.
    with start_sandbox(faults=FaultConfig(judge_error=0.3, seed=5)) as sb:
        yield sb
    if saved is None:
        os.environ.pop(KEY_ENV, None)
    else:
        os.environ[KEY_ENV] = saved


@pytest.fixture(scope="module")
def finished(sandbox, tmp_path_factory) -> RunPaths:
    return build_run(tmp_path_factory.mktemp("rejudge") / "store", sandbox.base_url)


def test_refilter_with_a_changed_verify_block_rejudges_every_shard_without_distilling(
    finished, sandbox, tmp_path, capsys
):
    paths = copy_run(finished, tmp_path / "store")
    before_markers, before = markers(paths), verdicts(paths)
    assert len(before_markers) == 2
    assert {r["verifier"] for r in before.values() if r["task_type"] == "open_qa"} - {None} == {"exact"}
    history = read_verify_history(paths.verify_history)
    assert [h["event"] for h in history] == ["judged"]  # the first filter recorded its settings
    # The run has a mixture and an export: refilter rebuilds them from the new accepted traces.
    saved, _ = open_run(paths.run_id, paths.store)
    raise_for_failures(run_stage(MixtureStage(paths, saved.mixture), LocalExecutor(progress=False)))
    raise_for_failures(
        run_stage(ExportStage(paths, saved.export.model_dump()), LocalExecutor(progress=False))
    )
    mixed_before = storage.read_json(storage.join(paths.mixture, "mixture.json"))["sources"]["pathvqa"]
    mark = requests_by_kind(sandbox)
    recipe_path = write_recipe(tmp_path / "judge.yaml", tmp_path / "store", sandbox.base_url, JUDGE)

    capsys.readouterr()
    assert main(["refilter", paths.run_id, "--store", paths.store, "--recipe", recipe_path]) == 0
    out = capsys.readouterr().out
    changed = [line for line in out.splitlines() if "verify settings differ" in line]
    assert len(changed) == 1 and "sources.pathvqa: exact -> judge" in changed[0]

    after_requests = requests_by_kind(sandbox)
    assert after_requests.get("sample", 0) == mark.get("sample", 0)  # ZERO distillation requests
    judge_requests = after_requests.get("judge", 0) - mark.get("judge", 0)
    assert judge_requests > 0
    # Every shard re-judged: new marker, new fingerprint (the NEW settings'), the raw commit unchanged.
    recipe, _ = open_run(paths.run_id, paths.store)
    assert recipe.verify == VerifySettings(**JUDGE)  # run.json records the new settings
    stage = FilterStage.for_recipe(paths, recipe)
    after_markers = markers(paths)
    assert after_markers.keys() == before_markers.keys()
    for shard, info in after_markers.items():
        assert info.extra["fingerprint"] == stage.fingerprint() != before_markers[shard].extra["fingerprint"]
        assert info.committed_at > before_markers[shard].committed_at
        assert stage.is_done(shard)
    # The verdicts changed as the judge decided: open answers by normalized match or the judge.
    after = verdicts(paths)
    assert after.keys() == before.keys()
    open_after = [r for r in after.values() if r["task_type"] == "open_qa" and r["verifier"]]
    assert {r["verifier"] for r in open_after} <= {"normalized", "judge"}
    judged = [r for r in open_after if r["verifier"] == "judge"]
    assert judged and all(r["correct"] == bool(r["judge_correct"]) for r in judged)
    flipped = [k for k, r in after.items() if r["correct"] != before[k]["correct"]]
    # What normalized match accepts never reaches the judge, so the judge can only flip rejections:
    # its errors here are false accepts, the rate the release card reports.
    assert flipped and all(after[k]["verifier"] == "judge" and after[k]["correct"] for k in flipped)
    closed = [r for r in after.values() if r["task_type"] != "open_qa" and r["judge_correct"] is not None]
    assert closed and all(r["verifier"] == "exact" for r in closed)  # calibration replies
    # Accepted rows carry the verifier's provenance.
    accepted = storage.Dataset(paths.accepted, ACCEPTED_SCHEMA).read_all().to_pylist()
    assert len(accepted) == sum(r["correct"] for r in after.values())
    for row in accepted:
        v = after[(row["question_id"], row["sample_idx"])]
        assert (row["verifier"], row["verifier_rule"], row["judge_correct"]) == (
            v["verifier"], v["verifier_rule"], v["judge_correct"],
        )  # fmt: skip
    mixed = storage.read_json(storage.join(paths.mixture, "mixture.json"))["sources"]["pathvqa"]
    assert mixed["accepted"] == len(accepted) > mixed_before["accepted"]
    exported = storage.read_json(storage.join(paths.export, "export.json"))
    assert sum(exported["rows"]["llamafactory"].values()) == mixed["rows_train"] + mixed["rows_validation"]
    # ... and so do the mixture rows (the exports read them): every judged trace says so.
    mixture_rows = [
        r
        for split in ("train", "validation")
        for r in storage.Dataset(storage.join(paths.mixture, split)).read_all().to_pylist()
    ]
    assert mixture_rows and all(
        (r["verifier"], r["verifier_rule"], r["judge_correct"])
        == (
            after[(r["question_id"], r["sample_idx"])]["verifier"],
            after[(r["question_id"], r["sample_idx"])]["verifier_rule"],
            after[(r["question_id"], r["sample_idx"])]["judge_correct"],
        )
        for r in mixture_rows
    )
    assert any(r["verifier"] == "judge" for r in mixture_rows)
    # The history: the old settings' verdicts, the change, the new settings' verdicts.
    history = read_verify_history(paths.verify_history)
    assert [h["event"] for h in history] == ["judged", "changed", "judged"]
    old, change, new = history
    assert old["settings"]["sources"] == {} and new["settings"]["sources"]["pathvqa"]["mode"] == "judge"
    assert change["by"] == "refilter" and change["to"]["settings"] == new["settings"]
    assert change["from"]["verify_fingerprint"] == old["verify_fingerprint"] != new["verify_fingerprint"]
    assert new["fingerprint"] == stage.fingerprint() and new["shards"] == 2
    stats = storage.read_json(paths.stats)
    assert (new["samples"], new["accepted"]) == (stats["overall"]["samples"], stats["overall"]["accepted"])
    assert new["verified_by"]["judge"] == len(judged) and new["judge_requests"] == judge_requests
    assert new["judge"]["model"] == "sandbox-r1" and "base_url" not in new["judge"]
    assert "false_accept_rate" in new["calibration"]
    assert "sk-rejudge-test" not in Path(paths.verify_history).read_text()

    # The same settings again: every judgement is in the journal, no request at all; one history
    # line per settings (the judged line is refreshed, not repeated).
    mark = requests_by_kind(sandbox)
    assert main(["refilter", paths.run_id, "--store", paths.store, "--recipe", recipe_path]) == 0
    assert "verify settings unchanged" in capsys.readouterr().out
    assert requests_by_kind(sandbox) == mark
    assert verdicts(paths) == after
    history = read_verify_history(paths.verify_history)
    assert [h["event"] for h in history] == ["judged", "changed", "judged"]
    assert (
        history[-1]["judge_requests"] == 0 and history[-1]["first_pass"]["judge_requests"] == judge_requests
    )
    assert history[-1]["applied_at"] == new["applied_at"] and history[-1]["updated_at"]

    # Back to exact match, from a verify file: the exact verdicts again, no request at all.
    verify_file = tmp_path / "exact.yaml"
    verify_file.write_text(yaml.safe_dump({"verify": {"default": "exact"}}))
    assert main(["refilter", paths.root, "--verify", str(verify_file), "--filter-only"]) == 0
    assert requests_by_kind(sandbox) == mark
    assert verdicts(paths) == before
    events = [h["event"] for h in read_verify_history(paths.verify_history)]
    assert events == ["judged", "changed", "judged", "changed", "judged"]


def test_refilter_errors_are_one_line_and_change_nothing(finished, sandbox, tmp_path, capsys):
    paths = copy_run(finished, tmp_path / "store")
    run_json = Path(paths.run_json).read_text()
    capsys.readouterr()
    cases = [
        ["refilter", str(tmp_path / "no-such-run")],
        ["refilter", "no-such-id", "--store", paths.store],
        ["refilter", paths.run_id, "--store", paths.store, "--verify", str(tmp_path / "missing.yaml")],
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"default": "fuzzy"}))
    cases.append(["refilter", paths.run_id, "--store", paths.store, "--verify", str(bad)])
    other_judge = tmp_path / "judge.yaml"
    other_judge.write_text(yaml.safe_dump({"sources": {"pathvqa": "judge"}, "judge": "nobody"}))
    cases.append(["refilter", paths.run_id, "--store", paths.store, "--verify", str(other_judge)])
    mark = requests_by_kind(sandbox)
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (argv, err)
    assert Path(paths.run_json).read_text() == run_json
    assert [h["event"] for h in read_verify_history(paths.verify_history)] == ["judged"]
    assert requests_by_kind(sandbox) == mark


def test_a_judge_that_is_not_a_run_teacher_is_refused(finished, tmp_path):
    """The run's teachers do not change with its verify settings: a judge must be one of them."""
    paths = copy_run(finished, tmp_path / "store")
    with pytest.raises(ConfigError, match=r"verify\.judge 'nobody' is not one of the recipe's teachers"):
        change_verify(paths, VerifySettings(sources={"pathvqa": "judge"}, judge="nobody"), by="test")
    recipe, line = change_verify(
        paths, VerifySettings(sources={"pathvqa": "judge"}, judge="default"), by="test"
    )
    assert recipe.verify.judge == "default" and line and "re-judges every shard" in line


def test_a_given_recipe_applies_its_verify_block_an_implied_one_only_says_so(finished, capsys):
    """``run RECIPE --run-id R`` re-judges with the recipe's verify block; ``demo --run-id R`` (the
    recipe is implied, not given) keeps the run's and says so; other blocks are named, not applied."""
    from cli.run import saved_run_verify

    saved, _ = open_run(finished.run_id, finished.store)
    same = saved_run_verify(saved, "r.yaml", finished.run_id, finished.store)
    assert same is None and capsys.readouterr().out == ""  # nothing differs: nothing to say
    other = parse_recipe(saved.public_dict() | {"verify": JUDGE, "shard_size": 7})
    assert saved_run_verify(other, "r.yaml", finished.run_id, finished.store) == other.verify
    (note,) = capsys.readouterr().out.splitlines()
    assert note.startswith(f"note: run {finished.run_id} keeps its saved shard_size settings")
    assert saved_run_verify(other, "demo", finished.run_id, finished.store, apply=False) is None
    (note,) = capsys.readouterr().out.splitlines()
    assert "shard_size, verify settings" in note and "refilter" in note
    assert saved_run_verify(other, "r.yaml", "not-a-run", finished.store) is None  # a new run
    assert open_run(finished.run_id, finished.store)[0].verify == saved.verify  # nothing written
