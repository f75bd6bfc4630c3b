"""The two test tiers: which tests start or need a real component (marked ``real`` by
tests/conftest.py at collection), and which subprocess command lines start one (the fast tier's
runtime check)."""

from __future__ import annotations

import os

# Session fixtures that start a real component (their users, direct or through other fixtures).
REAL_FIXTURES = {"prefect_harness", "ray_local", "s3_endpoint", "vllm_python", "vllm_server"}
# Folders and modules (relative to tests/) whose every test starts a real component.
REAL_PATHS = (
    "real/",  # a real Prefect server + PostgreSQL, two-raylet Ray clusters
    "experiment/test_experiment.py",  # the experiment CLI as a subprocess (Prefect + Ray + DeepSpeed)
    "test_export_llamafactory.py",  # LLaMA-Factory's own venv, one training step
)
# Tests that start one themselves: the CLI as a subprocess, python -m training.sft, torchrun, pip.
REAL_TESTS = {
    "inference/test_outage.py": {
        "test_a_45_s_restart_under_the_default_120_s_budget_finishes_the_cli_run_exactly"
    },
    "flows/test_busy_machine.py": {"test_demo_passes_beside_two_cpu_burners"},
    "distill/test_batch.py": {"test_kill_9_between_submit_and_collect_collects_the_same_batches"},
    "distill/test_distill_resume.py": {"test_kill_9_then_same_command_requests_nothing_stored"},
    "test_ingest.py": {"test_cli_unreachable_s3_endpoint_subprocess"},
    "test_sandbox.py": {"test_sandbox_teacher_command_runs_as_a_subprocess"},
    "test_venvs.py": {"test_cached_venv_builds_once_and_fails_in_one_line"},  # pip installs into a new venv
    "training/test_final_loss.py": {
        "test_final_loss_is_the_last_steps_loss_in_the_result_and_checkpoint_json"
    },
    "training/test_packing.py": {
        "test_sft_with_packing_trains_every_row",
        "test_vl_streaming_packed_and_padded_runs",
    },
    "training/test_sft.py": {
        "test_sft_zero3_on_cpu_to_s3_then_evaluate",
        "test_vl_sft_from_trl_export_streaming_then_evaluate",
        "test_torchrun_two_processes_zero3_checkpoints_on_s3",
        "test_killed_job_resumes_from_s3_with_identical_losses",
        "test_ray_train_two_workers_matches_torchrun",
        "test_failed_job_is_one_line",
        "test_stale_local_checkpoints_never_rotate_away_fresh_saves",
    },
}
# The real tier's longest files, longest first (measured: pytest --junitxml, 2026-12-07): tests/conftest.py
# moves them to the front and .ci/run keeps collection order (--no-loadscope-reorder; xdist otherwise
# orders files by their number of tests), so under `pytest -n N --dist loadfile` they start first
# instead of running alone at the end.
SLOW_FILES = (
    "experiment/test_experiment.py",  # ~720 s: the lab's CLI runs
    "real/test_prefect_server.py",  # ~590 s: a real Prefect server on SQLite and PostgreSQL
    "real/test_clusters.py",  # ~310 s: two-raylet Ray clusters
    "training/test_sft.py",  # ~270 s
    "inference/test_real_vllm.py",  # ~210 s
    "flows/test_flows.py",  # ~150 s
    "flows/test_busy_machine.py",  # ~110 s
    "training/test_once.py",  # ~100 s
)
# A subprocess starts a real component when a word of its command line is one of HEAVY_WORDS
# (a program or module name) or contains one of HEAVY_PARTS (conftest checks the fast tier by these).
HEAVY_WORDS = ("octomed-data", "torchrun", "deepspeed", "docker", "ray", "pip", "pip3", "venv")
HEAVY_PARTS = ("cli", "training.sft", "llamafactory", "vllm", "uvicorn", "raylet", "gcs_server")


def real_reason(rel: str, name: str, fixturenames) -> str | None:
    """Why the test ``name`` of ``rel`` (path relative to tests/, posix) is in the real tier, or None."""
    used = sorted(REAL_FIXTURES.intersection(fixturenames))
    if used:
        return "uses " + ", ".join(used)
    for prefix in REAL_PATHS:
        if rel == prefix or (prefix.endswith("/") and rel.startswith(prefix)):
            return f"in {prefix}"
    if name.split("[")[0] in REAL_TESTS.get(rel, ()):
        return "listed in REAL_TESTS"
    return None


def heavy_command(args) -> str | None:
    """The real component a subprocess command line starts, or None."""
    parts = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    words = []
    for part in parts:
        text = os.fsdecode(part) if isinstance(part, (bytes, os.PathLike)) else str(part)
        words += text.split() if isinstance(args, (str, bytes)) else [text]
    for word in words:
        if os.path.basename(word) in HEAVY_WORDS:
            return os.path.basename(word)
        for part in HEAVY_PARTS:
            if part in word:
                return part
    return None
