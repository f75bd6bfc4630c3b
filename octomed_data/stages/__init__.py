"""Stages and the executors that run them (see :mod:`octomed_data.stages.base`)."""

from octomed_data.stages.base import (
    GLOBAL_SHARD,
    Runtime,
    ShardIncomplete,
    ShardOutcome,
    Stage,
    StageFailed,
    StageResult,
    arun_one,
    describe_error,
    run_one,
)
from octomed_data.stages.local import Executor, LocalExecutor, raise_for_failures, run_stage

__all__ = [
    "GLOBAL_SHARD",
    "Executor",
    "LocalExecutor",
    "Runtime",
    "ShardIncomplete",
    "ShardOutcome",
    "Stage",
    "StageFailed",
    "StageResult",
    "arun_one",
    "describe_error",
    "raise_for_failures",
    "run_one",
    "run_stage",
]
