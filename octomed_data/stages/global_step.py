"""Global steps (mixture, export, release, report): one shard, ``"all"``, with a done marker like any shard.

A global step reads whole datasets, so its marker (a one-row shard ``"all"`` of its ``_done``
dataset, committed after its outputs) carries the step's settings ``fingerprint`` and, as
``input_committed_at``, a digest of every committed shard of every input dataset (name and
``committed_at``). :meth:`Stage.is_done` then answers as for any shard: a pass over a finished run
rebuilds nothing; a re-committed input shard (a re-filtered ``accepted``) or changed settings rebuild.
"""

from __future__ import annotations

import hashlib
import json
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from octomed_data import storage
from octomed_data.stages.base import GLOBAL_SHARD, Stage


def digest(value: Any) -> str:
    """A short, stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(uri: str) -> str | None:
    """The content hash of a file (None when it does not exist)."""
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()[:16] if storage.exists(uri) else None


class GlobalStage(Stage):
    """A stage of one global shard whose done-signal is its marker in :meth:`done_dataset`."""

    global_step = True

    @abstractmethod
    def done_uri(self) -> str:
        """Where the step's marker dataset lives (a layout name)."""

    @abstractmethod
    def inputs(self) -> Sequence[str]:
        """The datasets the step reads: a shard committed again in any of them rebuilds it."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Everything else that decides the outputs (the fingerprint's content)."""

    @abstractmethod
    def build(self) -> dict[str, Any]:
        """Write the step's outputs; return its counts (kept in the marker)."""

    def done_dataset(self) -> storage.Dataset:
        return storage.Dataset(self.done_uri())

    def fingerprint(self) -> str:
        return digest(self.settings())

    def input_version(self, shard: str) -> str:  # type: ignore[override]  # a digest, not one commit
        commits = {
            uri: storage.Dataset(uri).committed(lambda i: i.committed_at)  # one field held per marker
            for uri in self.inputs()
        }
        return digest(commits)

    def run_shard(self, shard: str) -> dict[str, Any]:
        # The commits this build reads: an input committed again meanwhile rebuilds on the next pass.
        read = self.input_version(shard)
        done = self.done_dataset()
        done.delete_shard(GLOBAL_SHARD)  # a build that fails half-way must not leave an older marker
        counts = self.build()
        marker = pa.table({"stage": [self.name]})
        done.write_shard(
            GLOBAL_SHARD, marker, extra=self.marker_extra(shard, counts, input_committed_at=read)
        )
        return counts
