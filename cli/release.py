"""``octomed-data release RUN_ID --out URI``: publish a filtered run as a dataset with its card."""

from __future__ import annotations

import argparse
import json

from octomed_data.layout import DEFAULT_STORE, ENV_STORE, default_store


def _cmd_release(args: argparse.Namespace) -> int:
    from octomed_data.runs import open_run
    from octomed_data.stages.committed import run_global_step
    from octomed_data.stages.release import ReleaseStage

    recipe, paths = open_run(args.run_id, default_store(args.store))
    stage = ReleaseStage(
        paths,
        args.out,
        all_responses=args.all_responses or recipe.release.all_responses,
        with_images=True if args.with_images else None,  # None: the recipe's release.with_images
        licenses=recipe.release.licenses,
        progress=True,
    )
    result = run_global_step(stage)  # done is the release's marker in the run, as in the flow
    summary = {k: v for k, v in result.items() if k != "files"} | {"files": len(result.get("files") or [])}
    print(json.dumps(summary, indent=2))
    images = f", {result['images']} image(s) embedded" if result.get("with_images") else ""
    print(
        f"release: {result['rows']} question(s), {result['responses']} response(s){images}; card {result['card']}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """``octomed-data release``."""
    p = subparsers.add_parser(
        "release", help="publish a filtered run as a dataset (Parquet + dataset card), e.g. to s3://"
    )
    p.add_argument("run_id", help="the run to release")
    p.add_argument("--out", required=True, help="release folder URI (path or s3://bucket/prefix)")
    p.add_argument(
        "--store", default=None, help=f"the run's store (default: ${ENV_STORE} or {DEFAULT_STORE})"
    )
    p.add_argument(
        "--all-responses", action="store_true", help="also the rejected responses, with their verdicts"
    )
    p.add_argument(
        "--with-images",
        action="store_true",
        help="embed the images (PNG bytes, datasets.Image) so a VLM trains from the release alone",
    )
    p.set_defaults(func=_cmd_release)
