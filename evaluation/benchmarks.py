"""The evaluation benchmarks: held-out test files -> QUESTION_SCHEMA rows, with skip counts.

The test sets are THE held-out benchmark table's (:data:`octomed_data.benchmarks.BENCHMARKS`, which
decontamination reads too): each :class:`~octomed_data.benchmarks.EvalSet` names the held-out
file(s) of one scored test set inside the benchmark data folder (``../shared/data`` by default;
see its README's "Benchmark TEST sets" table) and the EXISTING source loader (:data:`octomed_data.sources.FORMATS`) that reads them, so
evaluation and ingest parse every file the same way. Items a loader quarantines (an image that is
not available here -> ``missing_image``, a malformed record) are counted per reason and reported
as *skipped*, never dropped silently; records of the file outside the benchmark's test split
(PubMedQA's 500 non-test PQA-L items) are counted as *excluded*.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from octomed_data.benchmarks import EvalSet, benchmark_path, eval_sets
from octomed_data.errors import ConfigError
from octomed_data.images import ImageStore
from octomed_data.sources import iter_records

ENV_DATA_DIR = "OCTOMED_EVAL_DATA"
REPO_ROOT = Path(__file__).resolve().parent.parent

# The scored test sets of THE held-out benchmark table (octomed_data.benchmarks), by name.
BENCHMARKS: dict[str, EvalSet] = eval_sets()


def resolve_data_dir(data_dir: str | None = None) -> Path:
    """The benchmark folder: ``data_dir``, else ``$OCTOMED_EVAL_DATA``, else ``../shared/data`` of the repo."""
    chosen = data_dir or os.environ.get(ENV_DATA_DIR) or str(REPO_ROOT.parent / "shared" / "data")
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise ConfigError(f"benchmark data folder not found: {path} (pass --data-dir or set {ENV_DATA_DIR})")
    return path.resolve()


def get_benchmarks(names: list[str] | str) -> list[EvalSet]:
    """Specs for ``names`` (a list or a comma-separated string); an unknown name is one clear error."""
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    wanted = [n.strip() for n in names if n and n.strip()]
    if not wanted:
        raise ConfigError("no benchmarks named; see `octomed-data eval --list`")
    unknown = [n for n in wanted if n not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    return [BENCHMARKS[n] for n in dict.fromkeys(wanted)]


def benchmark_files(spec: EvalSet, data_dir: Path) -> list[Path]:
    """The file(s) to read for ``spec``; a missing file is one clear error (with the spec's hint)."""
    present = [benchmark_path(data_dir, f) for f in spec.files if benchmark_path(data_dir, f).exists()]
    if not present or (spec.all_files and len(present) != len(spec.files)):
        hint = f": {spec.missing_hint}" if spec.missing_hint else ""
        raise ConfigError(f"benchmark {spec.name!r}: {' / '.join(spec.files)} not found in {data_dir}{hint}")
    return present if spec.all_files else present[:1]


@dataclass
class LoadStats:
    """What loading one benchmark did: items kept, skipped (by reason), excluded (other splits)."""

    items: int = 0
    skipped: Counter = field(default_factory=Counter)
    excluded: int = 0
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "excluded_other_split": self.excluded,
            "files": self.files,
        }


def iter_benchmark(
    spec: EvalSet,
    data_dir: Path,
    image_store: ImageStore,
    stats: LoadStats,
    limit: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Question rows of ``spec`` in file order (streamed), at most ``limit``; counts go to ``stats``.

    With ``limit``, reading stops at the ``limit``-th evaluable item: the skip counts then cover
    the records read up to it, which is what was looked at.
    """
    images = data_dir / spec.images if spec.images else None
    for path in benchmark_files(spec, data_dir):
        stats.files.append(str(path))
        records = iter_records(
            spec.fmt,
            str(path),
            image_store=image_store,
            images_dir=str(images) if images is not None and images.is_dir() else None,
            source=spec.name,
            **spec.options,
        )
        for kind, row in records:
            if kind == "quarantine":
                stats.skipped[row["reason"]] += 1
                continue
            if spec.split is not None and row["split"] != spec.split:
                stats.excluded += 1
                continue
            stats.items += 1
            yield row
            if limit is not None and stats.items >= limit:
                return


def list_benchmarks(data_dir: str | None = None) -> list[dict[str, Any]]:
    """The registry as rows (name, title, files, whether the files are present) for ``eval --list``."""
    try:
        root: Path | None = resolve_data_dir(data_dir)
    except ConfigError:
        root = None
    rows = []
    for spec in BENCHMARKS.values():
        present = root is not None and any(benchmark_path(root, f).exists() for f in spec.files)
        images = bool(root is not None and spec.images and (root / spec.images).is_dir())
        rows.append({**spec.to_dict(), "present": present, "images_present": images})
    return rows
