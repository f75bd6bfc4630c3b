"""What a pass says about each shard: :class:`ShardOutcome`, and :class:`Outcomes`, the
shard -> outcome mapping of a pass's result, held compactly.

A pass's result holds one outcome per shard of the stage (10,000 shards: 10,000 outcomes, each
with its counts), and a flow holds several stages' results at once. :class:`Outcomes` behaves as
a ``dict`` of :class:`ShardOutcome` (insertion order, ``update``, ``|``, equality with a dict),
but keeps each outcome whose counts are plain JSON as that JSON (~100 bytes, not a ~500-byte
dict per level of counts): a REUSED shard's outcome is its counts alone. Each lookup builds the
outcome anew (equal to the one stored; a change to its counts is not kept).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

EMPTY = b"{}"  # the counts of an outcome that has none (one object for all of them)


@dataclass(slots=True)  # one per shard in a pass's result: no per-instance dict
class ShardOutcome:
    """What happened to one shard in one executor pass."""

    shard: str
    state: str  # COMPLETED | REUSED | FAILED
    counts: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"shard": self.shard, "state": self.state, "error": self.error, "seconds": self.seconds} | {
            "counts": self.counts
        }


def plain(value: Any) -> bool:
    """Whether ``value`` comes back from its JSON as it is (str-keyed dicts, lists, str, int,
    float, bool, None; no tuples, no int or str subclasses)."""
    kind = type(value)
    if kind is dict:
        return all(type(k) is str and plain(v) for k, v in value.items())
    if kind is list:
        return all(plain(v) for v in value)
    return kind in (str, int, float, bool) or value is None


def pack(outcome: ShardOutcome) -> ShardOutcome | bytes | tuple[str, bytes, str | None, float]:
    """An outcome as :class:`Outcomes` keeps it: a REUSED outcome's counts JSON, else
    ``(state, counts JSON, error, seconds)``; the outcome itself when its counts are not plain."""
    counts = outcome.counts
    if type(counts) is not dict or not plain(counts):
        return outcome
    data = json.dumps(counts, separators=(",", ":")).encode() if counts else EMPTY
    if outcome.state == "REUSED" and outcome.error is None and outcome.seconds == 0.0:
        return data
    return (outcome.state, data, outcome.error, outcome.seconds)


def unpack(shard: str, kept: ShardOutcome | bytes | tuple[str, bytes, str | None, float]) -> ShardOutcome:
    if isinstance(kept, ShardOutcome):
        return kept
    if isinstance(kept, bytes):
        return ShardOutcome(shard, "REUSED", json.loads(kept) if kept != EMPTY else {})
    state, data, error, seconds = kept
    return ShardOutcome(shard, state, json.loads(data) if data != EMPTY else {}, error, seconds)


class Outcomes(MutableMapping[str, ShardOutcome]):
    """shard -> :class:`ShardOutcome`, as a dict, kept compactly (see the module docstring)."""

    __slots__ = ("_kept",)

    def __init__(
        self, outcomes: Mapping[str, ShardOutcome] | Iterable[tuple[str, ShardOutcome]] = ()
    ) -> None:
        self._kept: dict[str, Any] = {}
        self.update(outcomes)

    def __getitem__(self, shard: str) -> ShardOutcome:
        return unpack(shard, self._kept[shard])

    def __setitem__(self, shard: str, outcome: ShardOutcome) -> None:
        self._kept[shard] = pack(outcome) if outcome.shard == shard else outcome

    def __delitem__(self, shard: str) -> None:
        del self._kept[shard]

    def __iter__(self) -> Iterator[str]:
        return iter(self._kept)

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, shard: object) -> bool:
        return shard in self._kept

    def __repr__(self) -> str:
        return f"Outcomes({dict(self.items())!r})"

    def update(self, other: Any = (), /, **more: ShardOutcome) -> None:
        if isinstance(other, Outcomes):  # already kept compactly: no unpacking
            self._kept.update(other._kept)
        else:
            super().update(other)
        for shard, outcome in more.items():
            self[shard] = outcome

    def copy(self) -> Outcomes:
        new = Outcomes()
        new._kept = dict(self._kept)
        return new

    def __or__(self, other: Any) -> Outcomes:
        if not isinstance(other, Mapping):
            return NotImplemented
        new = self.copy()
        new.update(other)
        return new

    def __ror__(self, other: Any) -> Outcomes:
        if not isinstance(other, Mapping):
            return NotImplemented
        new = Outcomes(other)
        new.update(self)
        return new

    def __getstate__(self) -> dict[str, Any]:
        return self._kept

    def __setstate__(self, kept: dict[str, Any]) -> None:
        self._kept = kept

    def failed(self) -> dict[str, str]:
        """Each FAILED shard's error (``"failed"`` when it has none), without building the others."""
        out: dict[str, str] = {}
        for shard, kept in self._kept.items():
            if isinstance(kept, bytes):  # REUSED
                continue
            state, error = (kept.state, kept.error) if isinstance(kept, ShardOutcome) else (kept[0], kept[2])
            if state == "FAILED":
                out[shard] = error or "failed"
        return out
