"""``octomed-data demo | run | rerun | serve | automation | deployments``: the factory's flows.

``run RECIPE --run-id R`` on an existing run keeps the run's saved recipe, except its ``verify:``
block: a changed one re-judges the run (the factory flow's ``verify``; one line says so).

It imports the Prefect flows lazily, only inside the function that runs a command, so neither the
library nor ``octomed-data --help`` depends on Prefect or Ray.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.layout import DEFAULT_STORE, STAGES, ExportFolder, RunPaths, default_store


def closed_network_defaults(local_ray: bool) -> None:
    """Settings for a laptop / CI run: no telemetry, no Ray token auth for a local Ray, and start
    limits for the embedded Prefect API fit for a busy machine (:mod:`flows.startup`)."""
    import logging

    from flows.startup import busy_machine_defaults

    busy_machine_defaults()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call drowns the output
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if local_ray:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _print_outputs(result: dict[str, Any]) -> None:
    root = result["root"]
    paths = RunPaths.at(root)
    lines = ["", f"run {result['run_id']} finished; everything is under {root}"]
    stage_outputs = [
        ("questions (Parquet):", paths.questions),
        ("removed by decontam:", paths.removed),
        ("samples (teacher replies):", paths.raw),
        ("samples, accepted:", paths.accepted),
        ("statistics:", paths.stats),
        ("mixture (train/validation):", paths.mixture),
    ]
    # Only what this run has produced (``--stage`` may have stopped early).
    lines += [f"  {label:<27} {uri}" for label, uri in stage_outputs if storage.exists(uri)]
    export = result.get("export") or {}
    for fmt, splits in (export.get("datasets") or {}).items():
        folder = (
            os.path.dirname(next(iter(splits.values())))
            if splits
            else ExportFolder(export["uri"]).format(fmt)
        )
        lines.append(f"  export {fmt + ':':<20} {folder} ({', '.join(splits)})")
    train = result.get("train") or {}
    if train:
        lines.append(f"  checkpoint:                 {train.get('train', {}).get('checkpoint_uri')}")
        if train.get("evaluate"):
            lines.append(f"  evaluation:                 {train['evaluate'].get('output_uri')}")
    report = result.get("report") or {}
    lines.append(f"  report:                     {report.get('report')} (plot: {report.get('plot')})")
    if report.get("sandbox"):
        lines.append(
            "  NOTE: samples came from the SANDBOX teacher (teacher=sandbox): they are NOT model traces."
        )
    print("\n".join(lines))


def _run_factory(
    recipe_path: str,
    *,
    run_id: str | None,
    store: str | None,
    shards: list[str] | None = None,
    stages: list[str] | None = None,
    recipe_given: bool = True,
) -> int:
    from octomed_data.recipe import load_recipe
    from octomed_data.runs import check_run_id

    if run_id is not None:
        check_run_id(run_id)  # one line and exit 2, before any recipe is read or Prefect starts
    recipe = None if run_id and shards else load_recipe(recipe_path)
    closed_network_defaults(local_ray=recipe is None or recipe.distill.ray_address is None)
    if recipe is not None and recipe.uses_sandbox() and (not stages or "distill" in stages):
        print(
            "teacher: none configured -> starting the SANDBOX teacher (NOT a model; rows say teacher=sandbox)"
        )
    verify = None
    if recipe is not None:
        verify = saved_run_verify(recipe, recipe_path, run_id, store, apply=recipe_given)
    from flows.startup import ensure_prefect_api

    ensure_prefect_api()  # the embedded API (no PREFECT_API_URL): a busy machine's limit, one retry
    from flows.common import RunParams
    from flows.factory import factory_flow

    params = RunParams(recipe_path=recipe_path, run_id=run_id, store=store, shards=shards)
    result = factory_flow(run=params, stages=stages, verify=verify)
    _print_outputs(result)
    return 0


# Recipe blocks that may differ from a run's saved recipe without meaning anything.
_NOT_SETTINGS = ("verify", "store", "base_dir")


def saved_run_verify(
    recipe: Any, recipe_path: str, run_id: str | None, store: str | None, *, apply: bool = True
) -> Any:
    """The recipe's verify settings when it is given for an existing run whose saved ones differ
    (the factory then re-judges the run with them), else None.

    A resumed run keeps every other setting it started with: the blocks of the recipe that differ
    from the saved ones are named in one line, so nothing is ignored silently. ``apply=False``
    (``demo --run-id``: the recipe is implied, not given) keeps the run's verify settings too and
    says so.
    """
    from octomed_data.runs import check_run_id, open_run

    if not run_id:
        return None
    where = default_store(store, recipe.store)
    if not storage.exists(RunPaths(where, check_run_id(run_id)).run_json):
        return None
    saved, _ = open_run(run_id, where)
    mine, theirs = recipe.public_dict(), saved.public_dict()
    ignored = [k for k in mine if k not in _NOT_SETTINGS and mine[k] != theirs.get(k)]
    if not apply and recipe.verify != saved.verify:
        ignored.append("verify")
    if ignored:
        hint = "" if apply else f"; to re-judge: octomed-data run RECIPE --run-id {run_id}, or refilter"
        print(
            f"note: run {run_id} keeps its saved {', '.join(ignored)} settings (the recipe {recipe_path} "
            f"differs there; a resumed run keeps what it started with, except a given recipe's verify:{hint})"
        )
    return recipe.verify if apply and recipe.verify != saved.verify else None


def _cmd_demo(args: argparse.Namespace) -> int:
    return _run_factory("demo", run_id=args.run_id, store=args.store, stages=args.stage, recipe_given=False)


def _cmd_run(args: argparse.Namespace) -> int:
    return _run_factory(args.recipe, run_id=args.run_id, store=args.store, stages=args.stage)


def _cmd_rerun(args: argparse.Namespace) -> int:
    from octomed_data.runs import check_run_id, open_run

    check_run_id(args.run_id)
    store = default_store(args.store)
    open_run(args.run_id, store)  # fail early, in one line, on a wrong id or store
    return _run_factory("demo", run_id=args.run_id, store=store, shards=args.shard or None)


def _cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import serve

    closed_network_defaults(local_ray=True)
    serve(recipe_path=args.recipe, with_automation=not args.no_automation, schedules=not args.no_schedules)
    return 0


def _cmd_automation(args: argparse.Namespace) -> int:
    from flows.automation import AUTOMATION_NAME, ensure_automation_for

    automation = ensure_automation_for(args.deployment, enabled=not args.disable)
    print(f"automation {AUTOMATION_NAME}: {'removed' if automation is None else 'created'}")
    return 0


def _cmd_deployments(args: argparse.Namespace) -> int:
    from flows.deployments import prefect_yaml

    text = prefect_yaml()
    if args.check:
        try:
            with open(args.check, encoding="utf-8") as fh:
                current = fh.read()
        except FileNotFoundError:
            raise ConfigError(f"{args.check} does not exist") from None
        if current != text:
            raise ConfigError(
                f"{args.check} differs from flows/deployments.py; "
                f"run: octomed-data deployments --write {args.check}"
            )
        print(f"{args.check} is up to date")
    elif args.write:
        with open(args.write, "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"wrote {args.write}")
    else:
        sys.stdout.write(text)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``demo``, ``run``, ``rerun`` and ``serve``."""
    stage_help = f"only these stages (repeatable): {', '.join(STAGES)}"
    d = subparsers.add_parser(
        "demo", help="the whole factory end to end on the bundled sample data (local Prefect + Ray)"
    )
    d.add_argument("--store", default=None, help=f"store URI (default: the demo recipe's, {DEFAULT_STORE})")
    d.add_argument("--run-id", default=None, help="resume this run instead of starting a new one")
    d.add_argument("--stage", action="append", choices=STAGES, help=stage_help)
    d.set_defaults(func=_cmd_demo)

    r = subparsers.add_parser("run", help="run the factory flow for a recipe file")
    r.add_argument("recipe", help="recipe YAML (or 'demo')")
    r.add_argument("--store", default=None, help="override the recipe's store URI")
    r.add_argument(
        "--run-id",
        default=None,
        help="resume this run (finished shards are reused; a recipe whose verify: block differs "
        "from the run's re-judges its stored replies)",
    )
    r.add_argument("--stage", action="append", choices=STAGES, help=stage_help)
    r.set_defaults(func=_cmd_run)

    rr = subparsers.add_parser(
        "rerun", help="re-run exactly the named shard(s) of a run, then rebuild outputs"
    )
    rr.add_argument("run_id")
    rr.add_argument("--shard", action="append", required=True, help="shard name or number (repeatable)")
    rr.add_argument(
        "--store", default=None, help=f"the run's store (default: $OCTOMED_STORE or {DEFAULT_STORE})"
    )
    rr.set_defaults(func=_cmd_rerun)

    s = subparsers.add_parser(
        "serve", help="serve the factory's deployments (schedules, UI forms, automation)"
    )
    s.add_argument("--recipe", default="demo", help="recipe the deployments run by default")
    s.add_argument("--no-automation", action="store_true", help="don't create the export->train automation")
    s.add_argument("--no-schedules", action="store_true", help="serve without cron schedules")
    s.set_defaults(func=_cmd_serve)

    a = subparsers.add_parser(
        "automation", help="create the export -> train automation for a deployed train deployment"
    )
    a.add_argument(
        "--deployment", default="train/train", help="FLOW/DEPLOYMENT to start when an export completes"
    )
    a.add_argument("--disable", action="store_true", help="remove the automation instead")
    a.set_defaults(func=_cmd_automation)

    dp = subparsers.add_parser(
        "deployments",
        help="print deploy/prefect.yaml as generated from flows/deployments.py (--write, --check)",
    )
    g = dp.add_mutually_exclusive_group()
    g.add_argument("--write", metavar="PATH", help="write the YAML to PATH (e.g. deploy/prefect.yaml)")
    g.add_argument("--check", metavar="PATH", help="exit 2 if PATH differs from the generated YAML")
    dp.set_defaults(func=_cmd_deployments)
