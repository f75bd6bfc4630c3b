"""Prefect tasks: thin wrappers around the library, one task per shard (never per sample).

Every task takes URIs and small settings, returns a small dict (counts, URIs), records its
shard state under the run (``state/<stage>/<shard>.json``) and persists its result to the
run's store. Re-runs skip finished work twice over: Prefect's cache (inputs + task source,
records kept in the store) and, inside each task, the committed-shard marker of its output,
which survives a killed process that never reported back to Prefect.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.tasks import exponential_backoff
from prefect.utilities.hashing import hash_objects

from octomed_data import storage
from octomed_data.errors import OctomedError
from octomed_data.recipe import DecontamSettings, RunPaths, record_shard

SHARD_CACHE = INPUTS + TASK_SOURCE


@dataclass
class CommittedOutputs(CachePolicy):
    """Inputs + task source, trusted only while the task's outputs are still committed.

    Prefect's cache alone would hand back a recorded result after someone deleted the outputs
    by hand (same run id, same inputs). ``probe`` fingerprints the committed outputs from the
    task's inputs; while they are missing the key is ``None`` (no cache lookup), so the task
    runs and rebuilds them. The fingerprint is part of the key, so a rewrite is a new entry.
    """

    probe: Callable[[dict[str, Any]], str | None] | None = None
    inner: CachePolicy = field(default_factory=lambda: SHARD_CACHE)

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        fingerprint = self.probe(inputs) if self.probe is not None else None
        if fingerprint is None:
            return None
        key = self.inner.compute_key(
            task_ctx=task_ctx, inputs=inputs, flow_parameters=flow_parameters, **kwargs
        )
        return None if key is None else hash_objects(key, fingerprint, raise_on_failure=True)


def _files_present(uri: str, files: list[str]) -> bool:
    """All ``files`` exist in the dataset folder ``uri`` (one listing, not one request per file)."""
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        return False
    listed = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    return set(files) <= listed


def shard_fingerprint(dataset_uri: str, shard: str) -> str | None:
    """The committed shard's marker + file as one string, or None when either is gone."""
    info = storage.Dataset(dataset_uri).shard_info(shard)
    if info is None or not storage.exists(storage.join(dataset_uri, info.file)):
        return None
    return f"{dataset_uri}|{info.shard}|{info.file}|{info.rows}|{info.committed_at}"


def dataset_fingerprint(dataset_uri: str) -> str | None:
    """Every committed shard's marker, when all their files are present; None otherwise."""
    manifest = storage.Dataset(dataset_uri).manifest()
    if not manifest or not _files_present(dataset_uri, [i.file for i in manifest.values()]):
        return None
    return "|".join(f"{i.shard}:{i.file}:{i.rows}:{i.committed_at}" for i in manifest.values())


def _joined(*parts: str | None) -> str | None:
    return None if any(p is None for p in parts) else "||".join(parts)  # type: ignore[arg-type]


def ingest_outputs(paths: RunPaths) -> str | None:
    """Fingerprint of a committed ingest: its summary file and every question shard."""
    out = paths.stage("ingest")
    if not storage.exists(storage.join(out, "ingest.json")):
        return None
    return dataset_fingerprint(storage.join(out, "questions"))


def index_outputs(paths: RunPaths) -> str | None:
    uri = storage.join(paths.stage("decontaminate"), "index.npz")
    return uri if storage.exists(uri) else None


def decontam_outputs(paths: RunPaths, shard: str) -> str | None:
    """Both halves of a decontaminated shard (kept questions and removed items) are committed."""
    out = paths.stage("decontaminate")
    return _joined(
        shard_fingerprint(storage.join(out, "questions"), shard),
        shard_fingerprint(storage.join(out, "removed"), shard),
    )


def distill_outputs(paths: RunPaths, shard: str, config: Any) -> str | None:
    """The engine's done marker (for this config) plus the committed raw and accepted shards."""
    from octomed_data.distill import accepted_uri, is_shard_done, raw_uri

    out = paths.stage("distill")
    if not is_shard_done(out, shard, config):
        return None
    return _joined(shard_fingerprint(raw_uri(out), shard), shard_fingerprint(accepted_uri(out), shard))


RETRY = {
    "retries": 2,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
}
# A shard task runs minutes to hours; these bound only the orchestration bookkeeping.
TASK_DEFAULTS: dict[str, Any] = {"persist_result": True, **RETRY}


class ShardIncomplete(OctomedError):
    """A shard finished with samples still missing (teacher failures): retry or re-run it."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:500]


def _tracked(stage: str, paths: RunPaths, shard: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``fn`` for one shard, recording RUNNING, then COMPLETED with its counts or FAILED."""
    t0 = time.time()
    record_shard(paths, stage, shard, "RUNNING")
    try:
        counts = fn()
    except BaseException as exc:
        record_shard(paths, stage, shard, "FAILED", error=_one_line(exc), seconds=round(time.time() - t0, 3))
        raise
    record_shard(paths, stage, shard, "COMPLETED", seconds=round(time.time() - t0, 3), **counts)
    return counts


# ------------------------------------------------------------------------------- ingest


@task(
    name="ingest-sources",
    cache_policy=CommittedOutputs(probe=lambda i: ingest_outputs(i["paths"])),
    **TASK_DEFAULTS,
)
def ingest_task(entries: list[dict[str, Any]], paths: RunPaths, shard_size: int) -> dict[str, Any]:
    """Ingest every source entry into ``RUN/ingest`` (questions, quarantine, images)."""
    from octomed_data.ingest import ingest_many

    out = paths.stage("ingest")
    questions = storage.Dataset(storage.join(out, "questions"))
    if ingest_outputs(paths) is not None:
        get_run_logger().info("ingest already committed at %s; reusing it", out)
        return storage.read_json(storage.join(out, "ingest.json"))

    def run() -> dict[str, Any]:
        result = ingest_many(entries, out, shard_size=shard_size)
        summary = _as_dict(result)
        summary["questions_uri"] = questions.uri
        summary["shards"] = list(questions.manifest())
        storage.write_json(storage.join(out, "ingest.json"), summary)
        return {
            "questions": sum(s.rows for s in questions.manifest().values()),
            "quarantined": summary.get("quarantined"),
        }

    _tracked("ingest", paths, "all", run)
    return storage.read_json(storage.join(out, "ingest.json"))


def _as_dict(result: Any) -> dict[str, Any]:
    if hasattr(result, "to_dict"):
        return result.to_dict()
    if isinstance(result, Mapping):
        return dict(result)
    if isinstance(result, list):
        return {"sources": [_as_dict(r) for r in result]}
    from dataclasses import asdict, is_dataclass

    if is_dataclass(result):
        return asdict(result)
    raise TypeError(f"unexpected ingest result {type(result).__name__}")


# ------------------------------------------------------------------------ decontaminate

_index_lock = threading.Lock()


@functools.lru_cache(maxsize=2)
def _load_index(uri: str):
    from octomed_data.decontam import DecontamIndex

    return DecontamIndex.load(uri)


@task(
    name="decontam-index",
    cache_policy=CommittedOutputs(probe=lambda i: index_outputs(i["paths"])),
    **TASK_DEFAULTS,
)
def decontam_index_task(settings: DecontamSettings, paths: RunPaths) -> str:
    """Build the benchmark index once per run and save it; shard tasks load it by URI."""
    from octomed_data.decontam import DecontamIndex

    uri = storage.join(paths.stage("decontaminate"), "index.npz")
    if not storage.exists(uri):
        index = DecontamIndex.from_registry(
            settings.registry, short_match=settings.short_match, phash_threshold=settings.phash_threshold
        )
        index.save(uri)
    return uri


@task(
    name="decontaminate-shard",
    cache_policy=CommittedOutputs(probe=lambda i: decontam_outputs(i["paths"], i["shard"])),
    **TASK_DEFAULTS,
)
def decontaminate_shard_task(
    index_uri: str, questions_uri: str, shard: str, settings: DecontamSettings, paths: RunPaths
) -> dict[str, Any]:
    """Decontaminate one question shard into ``RUN/decontaminate/{questions,removed}``."""
    from octomed_data.decontam import decontaminate_shard

    out = paths.stage("decontaminate")
    kept = storage.Dataset(storage.join(out, "questions"))
    info = kept.shard_info(shard)
    if info is not None and decontam_outputs(paths, shard) is not None:
        counts = {k: info.extra.get(k) for k in ("input", "kept", "removed")}
        record_shard(paths, "decontaminate", shard, "COMPLETED", reused=True, **counts)
        return info.extra

    def run() -> dict[str, Any]:
        with _index_lock:  # one load per process, shared by the shard threads
            index = _load_index(index_uri)
        counts = decontaminate_shard(
            index, questions_uri, shard, out, phash_threshold=settings.phash_threshold
        )
        return {k: counts[k] for k in ("input", "kept", "removed")} | {"by_benchmark": counts["by_benchmark"]}

    return _tracked("decontaminate", paths, shard, run)


@task(
    name="skip-decontamination",
    cache_policy=CommittedOutputs(probe=lambda i: shard_fingerprint(i["paths"].questions, i["shard"])),
    **TASK_DEFAULTS,
)
def passthrough_task(questions_uri: str, shard: str, paths: RunPaths) -> dict[str, Any]:
    """Decontamination off: copy the shard unchanged so later stages read one place."""
    from octomed_data.schema import QUESTION_SCHEMA

    target = storage.Dataset(paths.questions, QUESTION_SCHEMA)
    if shard_fingerprint(target.uri, shard) is not None:
        return {"input": target.shard_info(shard).rows}

    def run() -> dict[str, Any]:
        table = storage.Dataset(questions_uri).read_shard(shard)
        target.write_shard(shard, table)
        return {"input": table.num_rows, "kept": table.num_rows, "removed": 0}

    return _tracked("decontaminate", paths, shard, run)


# ------------------------------------------------------------------------------ distill


def resolve_api_keys(config: Any) -> dict[str, Any]:
    """Keys for teachers that name a Prefect Secret block, loaded here (never a flow parameter).

    Teachers without a block read their env var inside the engine; the sandbox needs no key.
    Values stay ``SecretStr`` so no repr or log line shows them.
    """
    from pydantic import SecretStr

    keys: dict[str, Any] = {}
    for teacher in config.teachers:
        if teacher.name == "sandbox":
            keys[teacher.name] = SecretStr("sandbox-needs-no-key")
        elif teacher.api_key_secret:
            from prefect.blocks.system import Secret

            try:
                keys[teacher.name] = SecretStr(str(Secret.load(teacher.api_key_secret).get()))
            except ValueError as exc:  # block missing: say which one, not the traceback
                raise OctomedError(
                    f"Prefect Secret block {teacher.api_key_secret!r} for teacher {teacher.name!r}: {exc}"
                ) from None
    return keys


@task(
    name="distill-shard",
    cache_policy=CommittedOutputs(probe=lambda i: distill_outputs(i["paths"], i["shard"], i["config"])),
    **TASK_DEFAULTS,
)
def distill_shard_task(
    questions_uri: str, shard: str, config: Any, ray_address: str | None, paths: RunPaths
) -> dict[str, Any]:
    """Distill one question shard on Ray (the engine's actor pool) into ``RUN/distill``."""
    out = paths.stage("distill")
    if distill_outputs(paths, shard, config) is not None:
        record_shard(paths, "distill", shard, "COMPLETED", reused=True)
        return {"shard": shard, "reused": True}

    def run() -> dict[str, Any]:
        from tasks.ray_distill import distill_shard_ray

        # Outputs deleted by hand: is_shard_done is then false and the engine rebuilds them from its
        # journal without re-requesting stored samples.
        report = distill_shard_ray(
            questions_uri, shard, out, config, address=ray_address, api_keys=resolve_api_keys(config)
        )
        report = _as_dict(report)
        if not report.get("complete", True):
            raise ShardIncomplete(
                f"shard {shard}: {report.get('failed')} sample(s) failed"
                + (f" ({report['aborted']})" if report.get("aborted") else "")
            )
        keep = ("questions", "new_samples", "accepted", "failed", "requests", "retries")
        return {k: report.get(k) for k in keep if k in report} | {"samples": report.get("expected")}

    return _tracked("distill", paths, shard, run)


@task(name="finalize-distill", **RETRY)
def finalize_task(paths: RunPaths, questions_uri: str) -> dict[str, Any]:
    """Per-source statistics and the cost ledger over every committed shard (cheap, always re-run)."""
    from octomed_data.distill import finalize

    return _as_dict(finalize(paths.stage("distill"), questions_uri=questions_uri))


# ------------------------------------------------------------------- mixture and export


@task(name="build-mixture", **RETRY)
def mixture_task(accepted_uri: str, questions_uri: str, paths: RunPaths, config: Any) -> dict[str, Any]:
    """The training mixture over all accepted traces (a global step, rebuilt on every run)."""
    from octomed_data.mixture import build_mixture

    result = build_mixture(accepted_uri, questions_uri, paths.stage("mixture"), config)
    return result.to_dict()


@task(name="export", **RETRY)
def export_task(mixture_uri: str, paths: RunPaths, settings: dict[str, Any]) -> dict[str, Any]:
    """LLaMA-Factory and TRL Parquet exports of the mixture (``settings``: the recipe's ExportSettings)."""
    from octomed_data.export import export

    return export(mixture_uri, paths.stage("export"), **settings).to_dict()
