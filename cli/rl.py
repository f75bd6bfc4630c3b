"""``octomed-data rl RUN_ID [--store URI]``: reinforcement learning after SFT on an existing run.

Runs the ``rl`` flow (what the dashboard's ``rl`` form and the automation after a train run start):
the RL prompts, GRPO on the run's SFT checkpoint (exactly once per checkpoint, RL data and
settings: a second command trains nothing and says so), the RL checkpoint's evaluation and
``rl/sft_vs_rl.md``. Exit 0 when the flow finished (trained, or nothing to train: it says so);
2 with one ``error:`` line for a wrong run or store, a run without a finished SFT checkpoint, a
setting out of range or a failed GRPO job; 1 for anything unexpected.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "rl", help="RL after SFT (GRPO, the factory's verifier as the reward) on an existing run"
    )
    p.add_argument("run_id", help="the run (with a finished SFT checkpoint)")
    p.add_argument("--store", default=None, help="the run's store (default: $OCTOMED_STORE or ./runs)")
    p.add_argument("--recipe", default="demo", help="recipe when the run records none (default: demo)")
    p.add_argument(
        "--max-steps", type=int, default=None, help="GRPO steps (default: the recipe's rl.trainer)"
    )
    p.add_argument("--num-generations", type=int, default=None, help="completions per prompt")
    p.add_argument(
        "--launcher",
        choices=["inprocess", "auto", "torchrun", "deepspeed"],
        default="inprocess",
        help="inprocess (CPU smoke, default); auto = torchrun with one process per GPU",
    )
    p.add_argument("--processes", type=int, default=None)
    p.add_argument("--no-evaluate", action="store_true", help="train only: no evaluation or comparison")
    p.set_defaults(func=_rl)


def _rl(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from octomed_data.errors import ConfigError
    from octomed_data.layout import default_store
    from octomed_data.runs import check_run_id

    check_run_id(args.run_id)  # one line, before Prefect starts
    try:
        from flows.common import RunParams
        from flows.rl import RLParams

        params = RLParams(
            run=RunParams(recipe_path=args.recipe, run_id=args.run_id, store=default_store(args.store)),
            max_steps=args.max_steps,
            num_generations=args.num_generations,
            launcher=args.launcher,
            processes=args.processes,
            evaluate=not args.no_evaluate,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    from cli.run import closed_network_defaults
    from flows.startup import ensure_prefect_api

    closed_network_defaults(local_ray=True)
    ensure_prefect_api()
    from flows.rl import rl_flow

    out = rl_flow(params)
    summary = {
        "run_id": out.get("run_id"),
        "trained": not out.get("skipped"),
        "steps": (out.get("rl") or {}).get("steps"),
        "checkpoint_uri": (out.get("rl") or {}).get("checkpoint_uri"),
        "comparison": out.get("comparison"),
    }
    if out.get("skipped"):
        print("rl: nothing to train (this SFT checkpoint, RL data and settings are trained already)")
    print(json.dumps(summary, default=str))
    return 0
