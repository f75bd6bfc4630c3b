"""The export's duplicate check is bounded in memory (issue 26): keys past the limit go to an
on-disk table, and the same rows come out whatever the limit."""

from __future__ import annotations

import os
import random
import tracemalloc

from octomed_data import storage
from octomed_data.export import export
from octomed_data.export_dedupe import KEY_COST_BYTES, SeenKeys, dedupe_limit_bytes
from octomed_data.layout import MixtureFolder
from octomed_data.mixture import MixtureConfig, build_mixture
from octomed_data.schema import MIXTURE_SCHEMA
from tests.support.orchestration import write_inputs


def _keys(n: int, seed: int) -> list[bytes]:
    """``n`` 16-byte keys, a quarter of them repeats of earlier ones (near and far back)."""
    rng = random.Random(seed)
    keys: list[bytes] = []
    for i in range(n):
        if i > 10 and rng.random() < 0.25:
            keys.append(keys[rng.randrange(i)])
        else:
            keys.append(rng.randbytes(16))
    return keys


def test_seen_keys_answer_as_a_set_across_spills():
    keys = _keys(5000, 1)
    expected: set[bytes] = set()
    with SeenKeys(50 * KEY_COST_BYTES) as seen:
        for key in keys:
            assert seen.add(key) == (key not in expected)
            expected.add(key)
        assert seen.spills > 50 and len(seen) == len(expected)
        assert len(seen.memory) < 50
        folder = seen.folder
        assert folder is not None and os.path.isdir(folder)
    assert not os.path.exists(folder)  # the on-disk table goes with the pass
    with SeenKeys(10**9) as roomy:  # under the limit: a set, nothing on disk
        assert [roomy.add(k) for k in keys] == [seen_first for seen_first in _first_seen(keys)]
        assert roomy.spills == 0 and roomy.folder is None


def _first_seen(keys: list[bytes]) -> list[bool]:
    seen: set[bytes] = set()
    out = []
    for key in keys:
        out.append(key not in seen)
        seen.add(key)
    return out


def _python_peak(keys: list[bytes], limit: int) -> int:
    tracemalloc.start()
    try:
        with SeenKeys(limit) as seen:
            for key in keys:
                seen.add(key)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_seen_keys_memory_is_flat_in_keys():
    """3x the keys under the same limit: the Python peak stays flat (a set of every key grows 3x).
    SQLite's own page cache is outside tracemalloc; it is capped at 4 MB (``cache_size``)."""
    small, large = _keys(20_000, 2), _keys(60_000, 3)
    limit = 64 * 1024
    peak_small, peak_large = _python_peak(small, limit), _python_peak(large, limit)
    assert peak_large < 1.3 * peak_small, (peak_small, peak_large)
    assert peak_large < 2 * limit + 64 * 1024, peak_large
    assert peak_large < len(set(large)) * 80 / 10  # a tenth of what one set of them takes


def test_dedupe_limit_follows_memory_mb():
    assert dedupe_limit_bytes(256) == 32 * 2**20
    assert dedupe_limit_bytes(0) == KEY_COST_BYTES  # at least one key


def test_export_rows_do_not_depend_on_the_memory_bound(shared_data, tmp_path):
    """Replies that normalise alike, across shards and splits: the export with a few keys in memory
    (spilled to disk every few rows) writes the same rows, in the same order, as with every key in
    memory, and counts the same duplicates."""
    accepted, questions = write_inputs(shared_data, str(tmp_path / "in"), n_text=6, n_image=2)
    mixture = build_mixture(
        accepted, questions, str(tmp_path / "mix"), MixtureConfig(validation_fraction=0.25)
    )
    out = str(tmp_path / "mix-dup")
    for split in ("train", "validation"):
        rows = storage.Dataset(storage.join(mixture.uri, split)).read_all().to_pylist()
        again = []
        for i, row in enumerate(rows):  # the same answer stated another way
            lines = row["response"].split("\n")
            last = [f"Answer: {row['extracted_answer']}", f"**{row['extracted_answer']}**"][i % 2]
            again.append(
                row | {"sample_idx": row["sample_idx"] + 100, "response": "\n".join([*lines[:-1], last])}
            )
        ds = storage.Dataset(MixtureFolder(out).split(split), MIXTURE_SCHEMA)
        ds.write_shard(0, rows[: len(rows) // 2] + again[len(rows) // 2 :])
        ds.write_shard(1, again[: len(rows) // 2] + rows[len(rows) // 2 :])  # repeats of shard 0's rows
    tight = export(out, str(tmp_path / "tight"), memory_mb=3 * KEY_COST_BYTES * 8 / 2**20)  # 3 keys
    roomy = export(out, str(tmp_path / "roomy"), memory_mb=1024)
    default = export(out, str(tmp_path / "default"))  # no mixture.json here: the default bound
    assert sum(tight.duplicates.values()) == mixture.rows_train + mixture.rows_validation
    for other in (roomy, default):
        assert other.duplicates == tight.duplicates and other.rows == tight.rows
    for name, splits in tight.datasets.items():
        for split, uri in splits.items():
            a = storage.Dataset(uri).read_all().to_pylist()
            b = storage.Dataset(roomy.datasets[name][split]).read_all().to_pylist()
            assert a == b and a, (name, split)
