"""Release: a global step publishing a filtered run as a dataset (:mod:`octomed_data.release`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from octomed_data.layout import ReleaseFolder, RunPaths
from octomed_data.stages.global_step import GlobalStage, file_digest


class ReleaseStage(GlobalStage):
    """Questions + ``filter/accepted`` (or ``distill/raw``) -> ``OUT/data/train-*`` + card.

    Done (its marker in the run, ``state/release/<hash of OUT>``, so the published folder holds only
    release files; and OUT's card, written last, must exist) for the same settings, the same recipe as run and registry
    pack, and the same commits of the run's questions, removed, raw, verdicts and accepted shards."""

    name = "release"

    def __init__(
        self,
        paths: RunPaths,
        out: str,
        *,
        all_responses: bool = False,
        with_images: bool | None = None,
        licenses: Mapping[str, str] | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__(paths)
        self.progress = progress  # a progress bar (the CLI); decides no output
        self.out = out
        self.all_responses = all_responses
        self.with_images = with_images  # None: the recipe's release.with_images
        self.licenses = dict(licenses or {})

    def done_uri(self) -> str:
        return self.paths.release_done(self.out)

    def is_done(self, shard: str) -> bool:
        from octomed_data import storage

        return super().is_done(shard) and storage.exists(ReleaseFolder(self.out).card)

    def inputs(self) -> list[str]:
        p = self.paths
        return [p.questions, p.removed, p.raw, p.verdicts, p.accepted]

    def settings(self) -> dict[str, Any]:
        from octomed_data import storage
        from octomed_data.release import RELEASE_VERSION
        from octomed_data.release_card import registry_uri

        run = storage.read_json(self.paths.run_json) if storage.exists(self.paths.run_json) else {}
        registry = ((run.get("recipe") or {}).get("decontam") or {}).get("registry")
        return {
            "version": RELEASE_VERSION,
            "out": self.out,
            "all_responses": self.all_responses,
            "with_images": self.with_images,
            "licenses": self.licenses,
            "run": file_digest(self.paths.run_json),
            "stats": file_digest(self.paths.stats),
            "registry": file_digest(registry_uri(registry)),
        }

    def build(self) -> dict[str, Any]:
        from octomed_data.release import release

        result = release(
            self.paths,
            self.out,
            all_responses=self.all_responses,
            with_images=self.with_images,
            licenses=self.licenses,
            progress=self.progress,
        )
        return result.to_dict()
