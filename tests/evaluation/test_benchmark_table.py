"""THE held-out benchmark table and the one ``eval`` command built on it."""

from __future__ import annotations

import pytest
import yaml

from cli import build_parser
from cli.eval import config_from_args
from evaluation.benchmarks import BENCHMARKS
from octomed_data import registry
from octomed_data.benchmarks import BENCHMARKS as TABLE
from octomed_data.benchmarks import eval_sets, expected_items, held_out_files
from octomed_data.errors import ConfigError
from octomed_data.schema import TaskType


def test_one_table_feeds_decontamination_and_evaluation():
    assert BENCHMARKS == eval_sets()
    assert [(s.benchmark, s.file, s.canonical, s.records) for s in registry.SPECS] == [
        (b.name, f.file, f.canonical, f.records) for b, f in held_out_files()
    ]
    assert registry.EXPECTED_ITEMS == expected_items()
    assert all(f.reader in registry.READERS for _, f in held_out_files())
    names = [e.name for b in TABLE for e in b.evaluation]
    assert len(names) == len(set(names))
    for bench in TABLE:
        assert bench.task_types and all(isinstance(t, TaskType) for t in bench.task_types)
        held = {f.file for f in bench.held_out}
        for test_set in bench.evaluation:
            # Every file evaluation scores is a held-out file decontamination knows (or their folder),
            # except PMC-VQA, which is not in the benchmark data folder.
            for f in test_set.files:
                assert not held or f in held or any(h.startswith(f + "/") for h in held), (test_set.name, f)


def _args(*argv: str):
    return build_parser().parse_args(["eval", *argv])


def test_eval_takes_a_config_file_and_flags_override_it(tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({"checkpoint_uri": "m", "benchmarks": "medqa,pubmedqa", "seeds": 3}))
    config = config_from_args(_args("--config", str(cfg), "--seeds", "2", "--no-force-end"))
    assert config.model == "m" and config.benchmarks == ["medqa", "pubmedqa"]
    assert config.seeds == 2 and config.force_end_of_thinking is False
    flags = config_from_args(_args("--model", "m", "--questions", str(tmp_path), "--limit", "4"))
    assert flags.questions_uri == str(tmp_path) and flags.benchmarks is None and flags.limit == 4
    with pytest.raises(ConfigError, match="--model is required"):
        config_from_args(_args("--benchmarks", "medqa"))
    with pytest.raises(ConfigError, match="--questions is required"):
        config_from_args(_args("--model", "m"))


def test_the_duplicate_eval_commands_are_gone():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert "eval" in sub.choices and "evaluate" not in sub.choices
