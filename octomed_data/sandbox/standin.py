"""The sandbox as a stand-in: it answers for a recipe's teachers and judge that name no endpoint.

Only the composition layers (the CLI, the flows) start it; the library decides nothing by the
sandbox's name (:func:`octomed_data.teachers.is_simulated` is the one rule for simulated teachers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from octomed_data.sandbox.server import start_sandbox
from octomed_data.sandbox.state import FaultConfig
from octomed_data.stages.filter import recipe_judge
from octomed_data.teachers import TeacherConfig

if TYPE_CHECKING:
    from octomed_data.recipe import Recipe


@contextlib.contextmanager
def judge_for(recipe: Recipe, notice: Any = print) -> Iterator[TeacherConfig | None]:
    """The recipe's judge with a live endpoint: when it has none, the sandbox runs meanwhile (its
    verdicts then come from the sandbox, not a model; ``notice`` is told so)."""
    if not recipe.verify.needs_judge:
        yield None
        return
    if not recipe.uses_sandbox():
        yield recipe_judge(recipe, sandbox_url=None)
        return
    notice("judge: no teacher endpoint configured -> the SANDBOX judge (NOT a model) decides open answers")
    with start_sandbox(
        latency_s=recipe.distill.sandbox.latency_s, faults=FaultConfig(**recipe.distill.sandbox.faults)
    ) as sandbox:
        yield recipe_judge(recipe, sandbox_url=sandbox.base_url)
