"""The mixture and export global steps over explicit folders: the ``mix`` and ``export`` commands.

Same stages as a run's (:class:`~octomed_data.stages.mixture.MixtureStage`,
:class:`~octomed_data.stages.mixture.ExportStage`), so the same done-signal: a one-row marker in
``OUT/_done`` committed after the outputs, with the settings and the commits of every input
dataset. The command line names its datasets itself (several ``--accepted``, any ``--out``), so
these read and write those URIs instead of a run's layout; attempt records and the step's lease
live under ``OUT/state/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from octomed_data.layout import ExportFolder, MixtureFolder, RunPaths
from octomed_data.mixture import MixtureConfig
from octomed_data.stages.mixture import ExportStage, MixtureStage


class FolderMixtureStage(MixtureStage):
    """``--accepted`` + ``--questions`` (+ audit) datasets -> ``OUT/{train,validation}``."""

    def __init__(
        self,
        accepted: Sequence[str],
        questions: Sequence[str],
        out: str,
        config: MixtureConfig | None = None,
        *,
        audit: Sequence[str] | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__(RunPaths.at(out), config)
        self.accepted_uris = list(accepted)
        self.question_uris = list(questions)
        self.audit_uris = list(audit) if audit is not None else None
        self.out = out
        self.show_progress = progress

    def done_uri(self) -> str:
        return MixtureFolder(self.out).done

    def inputs(self) -> list[str]:
        from octomed_data.mixture import audit_uri_beside

        audit: list[str] = []
        if self.config.exclude_audit_flags:
            audit = self.audit_uris or [audit_uri_beside(u) for u in self.accepted_uris]
        return [*self.accepted_uris, *self.question_uris, *audit]

    def build(self) -> dict[str, Any]:
        from octomed_data.mixture import build_mixture

        result = build_mixture(
            self.accepted_uris,
            self.question_uris,
            self.out,
            self.config,
            audit=self.audit_uris,
            progress=self.show_progress,
        )
        return result.to_dict()


class FolderExportStage(ExportStage):
    """A mixture folder (``train``/``validation``) -> ``OUT/llamafactory`` and ``OUT/trl/...``."""

    def __init__(
        self, mixture: str, out: str, settings: dict[str, Any] | None = None, *, progress: bool = False
    ) -> None:
        super().__init__(RunPaths.at(out), settings)
        self.mixture = mixture
        self.out = out
        self.show_progress = progress

    def done_uri(self) -> str:
        return ExportFolder(self.out).done

    def inputs(self) -> list[str]:
        folder = MixtureFolder(self.mixture)
        return [folder.split("train"), folder.split("validation")]

    def build(self) -> dict[str, Any]:
        from octomed_data.export import export

        return export(self.mixture, self.out, **self.export_settings, progress=self.show_progress).to_dict()
