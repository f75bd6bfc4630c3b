"""``octomed-data experiment SPEC``: the recipe lab (arms of one base run, trained, evaluated, compared)."""

from __future__ import annotations

import argparse


def _cmd_experiment(args: argparse.Namespace) -> int:
    from cli.run import closed_network_defaults
    from octomed_data.experiment import load_spec

    spec = load_spec(args.spec)  # a bad spec or arm name is one line, before Prefect starts
    for name in args.arm or []:
        spec.arm(name)
    closed_network_defaults(local_ray=True)
    from flows.experiment import ExperimentParams, experiment_flow

    out = experiment_flow(ExperimentParams(spec=args.spec, arms=args.arm, force=args.force, store=args.store))
    print(
        f"\nexperiment {spec.name}: report {out['report']} (plot {out['plot']}, numbers {out['comparison']})"
    )
    for group in out["same_data"]:
        print(f"  arms with identical training data: {', '.join(group)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``experiment``."""
    p = subparsers.add_parser(
        "experiment",
        help="run an experiment spec: arms selected from one base run, trained, evaluated, compared",
    )
    p.add_argument(
        "spec",
        help="spec YAML, or a ready-made one: sources, samples, length, cot, difficulty, samples_vs_epochs, teacher, sft_vs_rl",
    )
    p.add_argument("--arm", action="append", help="only this arm (repeatable), e.g. to re-run a failed one")
    p.add_argument("--force", action="store_true", help="re-run the chosen arms even when finished")
    p.add_argument(
        "--store", default=None, help="override the store (default: the spec's, else the recipe's)"
    )
    p.set_defaults(func=_cmd_experiment)
