"""What the mixture is built with and what it reports (:mod:`octomed_data.mixture`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from octomed_data import storage
from octomed_data.audit import Flag
from octomed_data.errors import ConfigError, StorageError
from octomed_data.layout import MixtureFolder


class MixtureConfig(BaseModel):
    """How accepted traces become the training mixture."""

    model_config = ConfigDict(extra="forbid")

    weights: dict[str, float] = Field(
        default_factory=dict,
        description="Per-source weight: <1 keeps that seeded fraction of its traces, >1 repeats them "
        "(2.5 = two copies plus a third for half). Unlisted sources use default_weight.",
    )
    default_weight: float = Field(1.0, ge=0)
    caps: dict[str, int] = Field(
        default_factory=dict, description="Per-source maximum number of distinct traces (before repeats)."
    )
    max_traces_per_question: int | None = Field(
        None, ge=1, description="Keep at most this many distinct accepted traces per question."
    )
    seed: int = 0
    validation_fraction: float = Field(0.05, ge=0, lt=1, description="Share of questions held out.")
    stratify_validation: bool = Field(
        True,
        description="Every (source, task type) with 2+ questions has questions in both splits "
        "(when validation_fraction > 0).",
    )
    shard_rows: int = Field(5000, ge=1, description="Target rows per output shard.")
    exclude_audit_flags: list[Flag] = Field(
        default_factory=list,
        description="Leave out every trace of questions the gold-label audit flagged with one of these "
        "(suspected_label_error, never_correct); empty: the audit is not read.",
    )
    memory_mb: int = Field(
        256,
        ge=8,
        description="Memory for the rows held at once, in MiB (the one memory bound): spill buffers, one "
        "work bucket and one output partition are sized from the rows' measured bytes, so longer traces "
        "mean more buckets and partitions, never more memory.",
    )
    bucket_rows: int | None = Field(
        None,
        ge=1,
        description="Also at most this many samples per work bucket (a test knob; memory_mb bounds bytes).",
    )

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in v.items() if not (w >= 0 and math.isfinite(w))}
        if bad:
            raise ValueError(f"weights must be finite and >= 0: {bad}")
        return v

    @field_validator("caps")
    @classmethod
    def _positive_caps(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: c for k, c in v.items() if c < 0}
        if bad:
            raise ValueError(f"caps must be >= 0: {bad}")
        return v

    def weight(self, source: str) -> float:
        return self.weights.get(source, self.default_weight)


@dataclass
class SourceCounts:
    """What happened to one source's accepted traces."""

    accepted: int = 0  # correct samples read
    duplicates: int = 0
    over_question_limit: int = 0
    dropped_by_weight: int = 0
    dropped_by_cap: int = 0
    missing_question: int = 0  # trace whose question is not in the questions dataset
    excluded_by_audit: int = 0  # traces of questions the gold-label audit flagged (exclude_audit_flags)
    questions_excluded_by_audit: int = 0
    selected: int = 0  # distinct traces kept
    rows_train: int = 0  # rows written, copies included
    rows_validation: int = 0


@dataclass
class MixtureResult:
    """Where the mixture went and what it holds."""

    uri: str
    train_uri: str
    validation_uri: str
    rows_train: int
    rows_validation: int
    questions_train: int
    questions_validation: int
    sources: dict[str, SourceCounts] = field(default_factory=dict)
    stratified_moves: int = 0  # questions moved between splits so every stratum is in both
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_result(out: str) -> MixtureResult:
    """Read ``OUT/mixture.json`` back."""
    uri = MixtureFolder(out).summary
    if not storage.exists(uri):
        raise StorageError(f"no mixture at {out} (missing mixture.json)")
    data = storage.read_json(uri)
    sources = {k: SourceCounts(**v) for k, v in data["sources"].items()}
    keep = {f for f in MixtureResult.__dataclass_fields__}
    return MixtureResult(**{k: v for k, v in data.items() if k in keep and k != "sources"}, sources=sources)


def parse_weights(items: Sequence[str] | None, kind: type = float) -> dict[str, Any]:
    """``["medqa=0.5", "pubmedqa=2"]`` -> ``{"medqa": 0.5, "pubmedqa": 2.0}`` (CLI helper)."""
    out: dict[str, Any] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"expected SOURCE=VALUE, got {item!r}")
        try:
            out[name.strip()] = kind(value)
        except ValueError:
            raise ConfigError(f"not a number in {item!r}") from None
    return out
