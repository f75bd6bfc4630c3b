"""The RL data as a global step (:mod:`octomed_data.rl.data`): rebuilt only when its inputs or settings change."""

from __future__ import annotations

from typing import Any

from octomed_data.layout import RLFolder, RunPaths
from octomed_data.rl.config import RLOptions
from octomed_data.stages.global_step import GlobalStage, file_digest


class RLDataStage(GlobalStage):
    """``decontaminate/{questions,removed}`` + ``filter/verdicts`` -> ``rl/data/{train,validation}``.

    Done (``rl/data/_done``) for the same commits of its inputs and the same settings: the options
    but the trainer's (and ``enabled``/``format_reward``, which decide no prompt), the run's
    ``export.answer_format`` (the system prompt) and the registry pack's content hash (a registry
    update rebuilds, so a newly registered benchmark item leaves the RL data).
    """

    name = "rl_data"

    def __init__(self, paths: RunPaths, options: RLOptions | None = None) -> None:
        """``options``: the recipe's ``rl:`` block (None: the run's recipe's)."""
        super().__init__(paths)
        if options is None:
            from octomed_data.rl.data import recipe_of

            options = recipe_of(paths).rl
        self.options = options

    def done_uri(self) -> str:
        return RLFolder(self.paths.rl).data_done

    def inputs(self) -> list[str]:
        return [self.paths.questions, self.paths.verdicts, self.paths.removed]

    def settings(self) -> dict[str, Any]:
        from octomed_data.rl.data import RL_DATA_VERSION, registry_pack, run_answer_format

        return {
            "version": RL_DATA_VERSION,
            **self.options.data_settings(),
            "answer_format": run_answer_format(self.paths),
            "registry": file_digest(registry_pack(self.paths)),
        }

    def build(self) -> dict[str, Any]:
        from octomed_data.rl.data import build_rl_data

        return build_rl_data(self.paths, self.options)["totals"]
