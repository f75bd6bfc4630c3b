"""Release: a global step publishing a filtered run as a dataset (:mod:`octomed_data.release`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from octomed_data.layout import RunPaths
from octomed_data.stages.base import Stage


class ReleaseStage(Stage):
    """Questions + ``filter/accepted`` (or ``distill/raw``) -> ``OUT/data/train-*`` + card (every pass)."""

    name = "release"
    global_step = True

    def __init__(
        self,
        paths: RunPaths,
        out: str,
        *,
        all_responses: bool = False,
        with_images: bool | None = None,
        licenses: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(paths)
        self.out = out
        self.all_responses = all_responses
        self.with_images = with_images  # None: the recipe's release.with_images
        self.licenses = dict(licenses or {})

    def run_shard(self, shard: str) -> dict[str, Any]:
        from octomed_data.release import release

        result = release(
            self.paths,
            self.out,
            all_responses=self.all_responses,
            with_images=self.with_images,
            licenses=self.licenses,
        )
        return result.to_dict()
