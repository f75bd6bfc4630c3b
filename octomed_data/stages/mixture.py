"""Mixture and export: global steps over every accepted trace (:mod:`octomed_data.mixture`, :mod:`.export`)."""

from __future__ import annotations

from typing import Any

from octomed_data import storage
from octomed_data.errors import StorageError
from octomed_data.layout import ExportFolder, MixtureFolder, RunPaths
from octomed_data.mixture import MixtureConfig
from octomed_data.stages.global_step import GlobalStage


class MixtureStage(GlobalStage):
    """``filter/accepted`` + questions (+ ``filter/audit``) -> ``mixture/{train,validation}``."""

    name = "mixture"

    def __init__(
        self,
        paths: RunPaths,
        config: MixtureConfig | None = None,
        *,
        questions: str | None = None,
        audit: str | None = None,
    ) -> None:
        """``questions``/``audit``: another run's (a lab arm's traces are its base run's); default the run's."""
        super().__init__(paths)
        self.config = config or MixtureConfig()
        self.questions = questions or paths.questions
        self.audit = audit or paths.audit

    def done_uri(self) -> str:
        return MixtureFolder(self.paths.mixture).done

    def inputs(self) -> list[str]:
        audit = [self.audit] if self.config.exclude_audit_flags else []
        return [self.paths.accepted, self.questions, *audit]

    def settings(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json")

    def build(self) -> dict[str, Any]:
        from octomed_data.mixture import build_mixture

        if not storage.Dataset(self.paths.accepted).has_committed():
            raise StorageError(f"no accepted samples at {self.paths.accepted}: run the filter stage first")
        return build_mixture(
            self.paths.accepted, self.questions, self.paths.mixture, self.config, audit=self.audit
        ).to_dict()


class ExportStage(GlobalStage):
    """``mixture`` -> ``export/llamafactory`` and ``export/trl/{text,vision}``."""

    name = "export"

    def __init__(self, paths: RunPaths, settings: dict[str, Any] | None = None) -> None:
        super().__init__(paths)
        self.export_settings = dict(settings or {})

    def done_uri(self) -> str:
        return ExportFolder(self.paths.export).done

    def inputs(self) -> list[str]:
        return [self.paths.mixture_train, self.paths.mixture_validation]

    def settings(self) -> dict[str, Any]:
        from octomed_data.export import EXPORT_VERSION

        return {"version": EXPORT_VERSION, **self.export_settings}

    def secret_env(self) -> list[str]:
        """The variables holding the keys the export must not contain: the default one and each
        teacher's the run names (names only; never in the fingerprint: they decide no output)."""
        from octomed_data.export import DEFAULT_SECRET_ENV
        from octomed_data.release_run import run_recipe, teacher_configs

        names = list(DEFAULT_SECRET_ENV)
        if storage.exists(self.paths.run_json):  # a lab arm has none: the default key variable
            names += [
                t.api_key_env for t in teacher_configs(self.paths, run_recipe(self.paths)) if t.api_key_env
            ]
        return list(dict.fromkeys(names))

    def build(self) -> dict[str, Any]:
        from octomed_data.export import export

        settings = self.export_settings
        return export(
            self.paths.mixture, self.paths.export, secret_env=self.secret_env(), **settings
        ).to_dict()
