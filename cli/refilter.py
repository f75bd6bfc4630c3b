"""``octomed-data refilter RUN [--recipe R | --verify FILE]``: judge a run's stored replies again.

No distillation: the filter stage reads ``distill/raw`` and writes new verdicts, accepted traces,
``stats.json`` and the report; an LLM judge is asked only what its journal does not hold. New
verify settings (a recipe's ``verify:`` block, or a YAML file holding one) replace the run's in
``run.json`` first, and ``filter/verify_history.jsonl`` records both. The run's mixture and export,
when it has them, are rebuilt from the new accepted traces (``--filter-only`` leaves them).
Runs in this process (no Prefect, no Ray); the Prefect UI's way is the filter deployment's
``verify`` field.
"""

from __future__ import annotations

import argparse
from typing import Any

from octomed_data.layout import DEFAULT_STORE, default_store


def load_verify_file(path: str) -> Any:
    """A YAML file holding a ``verify:`` block (or a mapping with a ``verify`` key)."""
    import yaml
    from pydantic import ValidationError

    from octomed_data.config import first_error, safe_load_capped
    from octomed_data.errors import ConfigError
    from octomed_data.verify import VerifySettings

    try:
        with open(path, encoding="utf-8") as fh:
            data = safe_load_capped(fh.read(), f"verify file {path}")
    except FileNotFoundError:
        raise ConfigError(f"verify file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"verify file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict) and set(data) == {"verify"}:
        data = data["verify"]
    if not isinstance(data, dict):
        raise ConfigError(f"verify file {path} must hold a mapping (the recipe's verify: block)")
    try:
        return VerifySettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid verify settings in {path}: {first_error(exc)}") from None


def _cmd_refilter(args: argparse.Namespace) -> int:
    from octomed_data import storage
    from octomed_data.recipe import load_recipe
    from octomed_data.runs import change_verify, open_run_folder
    from octomed_data.sandbox.standin import judge_for
    from octomed_data.stages import LocalExecutor, run_stage
    from octomed_data.stages.committed import raise_unless_committed, run_global_step
    from octomed_data.stages.filter import FilterStage

    store = default_store(args.store)
    recipe, paths = open_run_folder(args.run, store)
    verify = None
    if args.recipe:
        verify = load_recipe(args.recipe).verify
    elif args.verify:
        verify = load_verify_file(args.verify)
    if verify is not None:
        recipe, line = change_verify(paths, verify, by="refilter")
        print(line or f"run {paths.run_id}: verify settings unchanged; judging every shard again with them")
    before = storage.read_json(paths.stats)["overall"] if storage.exists(paths.stats) else None
    with judge_for(recipe) as judge:
        stage = FilterStage.for_recipe(paths, recipe, judge)
        if not stage.input_shards():
            from octomed_data.errors import StorageError

            raise StorageError(
                f"run {paths.run_id} has no distilled replies at {stage.raw}: nothing to judge"
            )
        result = run_stage(stage, LocalExecutor(progress=True), force=True)
        raise_unless_committed(result)  # one line: the shards not re-judged, and why
    counts = [o.counts or {} for o in result.outcomes.values()]
    stats = (result.final or {}).get("stats") or {}
    after = stats.get("overall") or {}
    judged = sum(int(c.get("judge_requests") or 0) for c in counts)
    was = f" (was {before['accepted']} of {before['samples']})" if before else ""
    print(
        f"refilter: {len(result.outcomes)} shard(s) judged again: {after.get('accepted')} of "
        f"{after.get('samples')} samples accepted{was}; {judged} judge request(s), no distillation request"
    )
    from octomed_data.stages.report import ReportStage

    report = run_global_step(ReportStage(paths))
    print(f"  statistics: {paths.stats}\n  report:     {report['report']}")
    print(f"  history:    {paths.verify_history}")
    if not args.filter_only:
        _downstream(paths, recipe)
    return 0


def _downstream(paths: Any, recipe: Any) -> None:
    """Rebuild the mixture and export the run already has: they hold the old verdicts' traces."""
    from octomed_data import storage
    from octomed_data.stages.committed import run_global_step
    from octomed_data.stages.mixture import ExportStage, MixtureStage

    if not storage.exists(paths.mixture_summary):
        return
    run_global_step(MixtureStage(paths, recipe.mixture))
    print(f"  mixture:    {paths.mixture} (rebuilt from the new accepted traces)")
    if storage.exists(paths.export_summary):
        run_global_step(ExportStage(paths, recipe.export.model_dump()))
        print(f"  export:     {paths.export} (rebuilt)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """``octomed-data refilter``."""
    p = subparsers.add_parser(
        "refilter",
        help="judge a run's stored replies again (new verify settings), no distillation request",
        description=(
            "Judge every filter shard of a run again from its stored teacher replies, optionally with "
            "new verify settings (recorded in run.json and filter/verify_history.jsonl); rebuilds "
            "the run's mixture and export when it has them."
        ),
    )
    p.add_argument("run", metavar="RUN_ID_OR_FOLDER", help="run id (under --store) or the run's folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--recipe", help="take the verify: block of this recipe (YAML path or 'demo')")
    src.add_argument("--verify", metavar="FILE.yaml", help="a YAML file holding the new verify: block")
    p.add_argument(
        "--store", default=None, help=f"the run's store (default: $OCTOMED_STORE or {DEFAULT_STORE})"
    )
    p.add_argument("--filter-only", action="store_true", help="do not rebuild the run's mixture and export")
    p.set_defaults(func=_cmd_refilter)
