"""Training exactly once: what a job finds in its checkpoint folder before it trains anything.

A finished training (``checkpoint.json`` at ``output_uri``) of the same settings on the same data
is never trained again (:func:`prior_training` says ``done``); one whose settings differ only by a
larger ``max_steps`` is extended from its last intermediate checkpoint (``extend``); any other
difference is reported by name (``other``). The command line and the train flow refuse ``other``
unless forced, and a forced job goes to a folder of its own (:func:`forced_output`), so an old
model is never overwritten by a job with other settings.

An intermediate checkpoint is resumed when it was trained with the same settings, or with the
same settings but a smaller ``max_steps`` (an extension), on the same data, and is not past the
job's ``max_steps`` (:func:`resumable`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.job_config import TrainConfig
from octomed_data.layout import CheckpointFolder

State = Literal["none", "done", "extend", "other"]

# Test-only fault injection: a job with this variable set kills itself (SIGKILL) after its final
# model is uploaded and before ``checkpoint.json`` is written (a crash between the last checkpoint
# and the final marker). Never set in production.
ENV_KILL_BEFORE_FINAL_MARKER = "OCTOMED_FAULT_KILL_BEFORE_FINAL_MARKER"


@dataclass
class Prior:
    """What ``output_uri`` holds for a job: ``state``, the finished marker, the settings that differ."""

    state: State
    marker: dict[str, Any] = field(default_factory=dict)
    differs: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # setting -> (finished, asked)
    other_data: bool = False  # the finished training read other data files (a new export)

    @property
    def step(self) -> int:
        return int(self.marker.get("step") or 0)

    def describe(self) -> str:
        """The differences in one line: ``learning_rate 0.002 -> 0.001, max_steps 4 -> 2``."""
        parts = [f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(self.differs.items())]
        if self.other_data:
            parts.append("other training data")
        return ", ".join(parts) or "no difference"


def settings_diff(old: dict[str, Any], config: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The settings (:meth:`TrainConfig.settings`) in which ``config`` differs from a marker's ``config``."""
    new = config.settings()
    return {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}


def is_extension(differs: dict[str, tuple[Any, Any]], step: int) -> bool:
    """Only ``max_steps`` differs and it asks for more steps than were trained (and were asked)."""
    if set(differs) != {"max_steps"}:
        return False
    old, new = differs["max_steps"]
    return old is not None and new is not None and new > step and new > old


def prior_training(config: TrainConfig, data_manifest: list[dict[str, Any]]) -> Prior:
    """What the finished training at ``config.output_uri`` (if any) means for this job."""
    marker_uri = CheckpointFolder(config.output_uri).marker
    if not storage.exists(marker_uri):
        return Prior("none")
    marker = storage.read_json(marker_uri)
    differs = settings_diff(marker.get("config") or {}, config)
    other_data = marker.get("data_manifest") != data_manifest
    prior = Prior("other", marker, differs, other_data)
    if other_data:
        return prior
    if not differs:
        prior.state = "done"
    elif is_extension(differs, prior.step):
        prior.state = "extend"
    return prior


def resumable(marker: dict[str, Any], config: TrainConfig, data_manifest: list[dict[str, Any]]) -> bool:
    """An intermediate checkpoint's marker this job may continue from (see the module's doc)."""
    if marker.get("data_manifest") != data_manifest:
        return False
    if config.max_steps is not None and int(marker.get("step") or 0) > config.max_steps:
        return False
    differs = settings_diff(marker.get("config") or {}, config)
    if not differs:
        return True
    if set(differs) != {"max_steps"}:
        return False
    old, new = differs["max_steps"]
    return old is not None and new is not None and new > old


def finished_result(prior: Prior, rows: int) -> dict[str, Any]:
    """A finished training's result, as ``train`` returns it, from its marker (nothing trained)."""
    m = prior.marker
    return {
        "checkpoint_uri": None,  # filled by the caller (where it looked)
        "steps": prior.step,
        "final_loss": m.get("loss"),
        "mean_loss": m.get("mean_loss"),
        "samples_seen": 0,  # in this call
        "rows": rows,
        "skipped": m.get("skipped") or {},
        "truncated": int(m.get("truncated") or 0),
        "resumed_from_step": prior.step,
        "examples_per_step": m.get("examples_per_step"),
        "packing": m.get("packing"),
        "trained_already": True,
    }


def forced_output(config: TrainConfig) -> str:
    """Where a forced job trains when ``output_uri`` holds a finished training of other settings:
    a folder of its own beside it, named by the job's settings (``<output_uri>-<config hash>``)."""
    return f"{config.output_uri.rstrip('/')}-{config.config_hash()}"


def route_output(
    config: TrainConfig, data_manifest: list[dict[str, Any]], *, force: bool
) -> tuple[TrainConfig, str]:
    """(the job to run, one line saying what it will do) for the command line and the train flow.

    Same settings, finished: the job as is (it trains nothing). Only a larger ``max_steps``: the job
    as is (it extends the run). Other settings: a ConfigError naming them, or with ``force`` the job
    into :func:`forced_output` (the old model is kept). Other data (a new export): the job as is.
    """
    prior = prior_training(config, data_manifest)
    where = config.output_uri
    if prior.state == "none":
        return config, f"training into {where}"
    if prior.state == "done":
        return config, f"{where} is trained already with these settings (step {prior.step}); nothing to train"
    if prior.state == "extend":
        return (
            config,
            f"extending the training at {where} from step {prior.step} to max_steps {config.max_steps}",
        )
    if prior.other_data and not prior.differs:
        return (
            config,
            f"{where} was trained on other data (step {prior.step}): training on this data from step 0",
        )
    if not force:
        raise ConfigError(
            f"{where} holds a finished training with other settings ({prior.describe()}); nothing "
            f"trained: force it to train these settings into {forced_output(config)} (the old model is kept)"
        )
    forced = config.model_copy(update={"output_uri": forced_output(config)})
    return forced, (
        f"{where} holds a finished training with other settings ({prior.describe()}): "
        f"forced, training these settings into {forced.output_uri} (the old model is kept)"
    )
