"""Distillation: N teacher samples per question, verified, durable, resumable.

``adistill_shard`` / ``distill_shard`` run one questions shard into ``OUT/raw`` (replies, no
verdict); ``run_local`` runs the distill stage in-process; ``finalize`` runs the filter stage
(:mod:`octomed_data.rejection`: verdicts, accepted traces, statistics) and the cost ledger; ``estimate``
projects a run's cost and duration from a small sample. The Ray executor lives in
``tasks/ray_executor.py`` and calls the same functions.
"""

from octomed_data.distill.engine import (
    ShardReport,
    adistill_shard,
    config_fingerprint,
    distill_shard,
    is_shard_done,
    raw_uri,
    shard_names,
)
from octomed_data.distill.journal import read_done_keys, sample_key
from octomed_data.distill.run import estimate, finalize, run_local
from octomed_data.inference.client import TeacherUnreachable, sample_seed

__all__ = [
    "ShardReport",
    "TeacherUnreachable",
    "adistill_shard",
    "config_fingerprint",
    "distill_shard",
    "estimate",
    "finalize",
    "is_shard_done",
    "raw_uri",
    "read_done_keys",
    "run_local",
    "sample_key",
    "sample_seed",
    "shard_names",
]
