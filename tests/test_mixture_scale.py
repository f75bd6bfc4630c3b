"""Mixture at scale (issue 26): what keeps the mixture step linear in the samples (fast tier)."""

from __future__ import annotations

import sys

import numpy as np

from octomed_data import storage
from octomed_data.mixture import MixtureConfig, build_mixture
from tests.support.mixture import accepted_inputs


def _inputs(root: str, n_questions: int, samples: int) -> tuple[str, str]:
    """``n_questions`` questions with ``samples`` short accepted traces each (4 shards)."""
    per_shard = -(-n_questions * samples // 4)
    return accepted_inputs(root, n_questions, samples, lambda i, k: f"case {i}: finding {k} " * 8, per_shard)


def test_spill_levels_add_no_per_row_hashing(tmp_path, monkeypatch):
    """Issue 26: a spill level re-partitions Arrow tables, hashing each distinct question of a chunk
    once (the shuffle's ranges: numpy on the keys), so more rows -> more buckets -> more levels
    add no per-row Python work. Before, every level hashed every row again (``h64`` per trace and
    per question): x13.3 CPU per 10x samples at 2M. Here many levels (fan-out 2: 5 for the
    samples) add < 0.3 hashes per trace per extra level (one per distinct question of a chunk, here
    12 traces each, and its question row; every trace again before), and write the same rows."""
    from octomed_data import mixture_partition, mixture_select

    inputs = _inputs(str(tmp_path / "in"), 240, 12)  # 2,880 traces
    cfg = MixtureConfig(memory_mb=8, validation_fraction=0.1, bucket_rows=100)  # 29 buckets
    original = mixture_select.h64
    calls = {"n": 0}

    def counted(*parts):
        calls["n"] += 1
        return original(*parts)

    for module in [m for name, m in sys.modules.items() if name.startswith("octomed_data.mixture")]:
        if getattr(module, "h64", None) is original:
            monkeypatch.setattr(module, "h64", counted)
    levels: list[int] = []
    finish = mixture_partition.Partition.finish
    monkeypatch.setattr(
        mixture_partition.Partition, "finish", lambda self: (levels.append(self.levels), finish(self))[1]
    )
    built = {}
    for name, min_chunk in (("leveled", 10**9), ("one_pass", 1)):  # fan-out 2, then unbounded
        monkeypatch.setattr(mixture_partition, "MIN_CHUNK_BYTES", min_chunk)
        calls["n"] = 0
        result = build_mixture(*inputs, str(tmp_path / name), cfg)
        built[name] = (result, calls["n"])
    assert levels[0] >= 5 and set(levels[4:]) == {1}, levels
    (leveled, leveled_calls), (one_pass, one_pass_calls) = built["leveled"], built["one_pass"]
    per_trace_and_level = (leveled_calls - one_pass_calls) / (240 * 12 * (levels[0] - 1))
    assert per_trace_and_level < 0.3, (leveled_calls, one_pass_calls, levels)
    rows = lambda res: list(storage.Dataset(res.train_uri).iter_rows())  # noqa: E731
    assert rows(leveled) == rows(one_pass) and len(rows(one_pass)) == one_pass.rows_train > 2000


def test_shuffle_ranges_are_the_exact_integer_formula():
    """The shuffle's spill range of a 64-bit key, computed in numpy, equals Python's exact
    ``(k * n_out // 2**64) * n_spill // n_out`` (no float rounding, no uint64 overflow)."""
    from octomed_data.mixture_partition import spill_ranges

    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**64, size=20_000, dtype=np.uint64, endpoint=False)
    edges = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]
    keys = np.concatenate([keys, np.array(edges, dtype=np.uint64)])
    for n_out, n_spill in ((1, 1), (7, 3), (97, 97), (1000, 26), (2**31 - 1, 12345)):
        got = spill_ranges(keys, n_out, n_spill).tolist()
        want = [(int(k) * n_out // 2**64) * n_spill // n_out for k in keys.tolist()]
        assert got == want, (n_out, n_spill)
