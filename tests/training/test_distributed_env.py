"""An in-process training job sets the launcher variables only for its own length."""

from __future__ import annotations

import os

from training.distributed import distributed_env

NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_the_block_sets_what_torch_distributed_reads_and_leaves_nothing_behind(monkeypatch) -> None:
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    with distributed_env():
        inside = {name: os.environ.get(name) for name in NAMES}
    assert inside["RANK"] == "0" and inside["WORLD_SIZE"] == "1" and inside["MASTER_ADDR"] == "127.0.0.1"
    assert int(inside["MASTER_PORT"]) > 0
    assert {name: os.environ.get(name) for name in NAMES} == dict.fromkeys(NAMES)


def test_a_launchers_variables_are_kept_and_restored_after_an_error(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("MASTER_PORT", "29501")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    try:
        with distributed_env():
            assert os.environ["RANK"] == "3" and os.environ["MASTER_PORT"] == "29501"
            assert os.environ["WORLD_SIZE"] == "1"
            raise RuntimeError("the job failed")
    except RuntimeError:
        pass
    assert os.environ["RANK"] == "3" and os.environ["MASTER_PORT"] == "29501"
    assert "WORLD_SIZE" not in os.environ
