"""Mixture and export: global steps over every accepted trace (:mod:`octomed_data.mixture`, :mod:`.export`)."""

from __future__ import annotations

from typing import Any

from octomed_data import storage
from octomed_data.errors import StorageError
from octomed_data.layout import RunPaths
from octomed_data.mixture import MixtureConfig
from octomed_data.stages.base import Stage


class MixtureStage(Stage):
    """``filter/accepted`` + questions -> ``mixture/{train,validation}`` (rebuilt on every pass)."""

    name = "mixture"
    global_step = True

    def __init__(self, paths: RunPaths, config: MixtureConfig | None = None) -> None:
        super().__init__(paths)
        self.config = config or MixtureConfig()

    def run_shard(self, shard: str) -> dict[str, Any]:
        from octomed_data.mixture import build_mixture

        if not storage.Dataset(self.paths.accepted).manifest():
            raise StorageError(f"no accepted samples at {self.paths.accepted}: run the filter stage first")
        return build_mixture(
            self.paths.accepted, self.paths.questions, self.paths.mixture, self.config, audit=self.paths.audit
        ).to_dict()


class ExportStage(Stage):
    """``mixture`` -> ``export/llamafactory`` and ``export/trl/{text,vision}`` (rebuilt on every pass)."""

    name = "export"
    global_step = True

    def __init__(self, paths: RunPaths, settings: dict[str, Any] | None = None) -> None:
        super().__init__(paths)
        self.settings = dict(settings or {})

    def run_shard(self, shard: str) -> dict[str, Any]:
        from octomed_data.export import export

        return export(self.paths.mixture, self.paths.export, **self.settings).to_dict()
