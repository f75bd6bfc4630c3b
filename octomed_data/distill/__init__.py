"""Distillation: N teacher samples per question, durable and resumable.

``adistill_shard`` / ``distill_shard`` run one questions shard into ``OUT/raw`` (replies, no
verdict; :mod:`~octomed_data.distill.engine`, compaction and the done-signal in
:mod:`~octomed_data.distill.compact`); ``estimate`` projects a run's cost and duration from a small
sample. Running the distill stage and then the filter stage (the CLI's ``run_local``,
``finalize``) is :mod:`octomed_data.stages.distill_run`'s.
"""

from octomed_data.distill.compact import ShardReport, config_fingerprint, is_shard_done
from octomed_data.distill.engine import adistill_shard, distill_shard
from octomed_data.distill.journal import raw_uri, read_done_keys, sample_key
from octomed_data.distill.run import estimate
from octomed_data.inference.client import TeacherUnreachable, sample_seed

__all__ = [
    "ShardReport",
    "TeacherUnreachable",
    "adistill_shard",
    "config_fingerprint",
    "distill_shard",
    "estimate",
    "is_shard_done",
    "raw_uri",
    "read_done_keys",
    "sample_key",
    "sample_seed",
]
