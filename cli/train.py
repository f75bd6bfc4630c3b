"""``octomed-data train`` / ``tiny-model`` commands (``eval`` is :mod:`cli.eval`).

``train`` starts the job through a launcher (torchrun by default, one process per GPU) and runs it
exactly once per settings and output folder (:mod:`training.once`): the same settings train
nothing, a larger ``--max-steps`` extends a finished run, other settings are refused in one line
unless ``--force``. Killing the command (even ``kill -9``) stops its launcher and workers. For
several nodes, ``train --launch-line N`` prints the ``deepspeed`` (or ``torchrun``) command that
runs ``python -m training.sft`` on N GPUs with the same config.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the training commands to the ``octomed-data`` parser."""
    p = subparsers.add_parser("train", help="SFT a model on an exported mixture (HF Trainer + DeepSpeed)")
    p.add_argument(
        "--config", required=True, help="TrainConfig YAML (e.g. training/configs/octomed-7b-zero3.yaml)"
    )
    p.add_argument("--train-data", nargs="+", default=None, help="export folder(s) or Parquet file(s)")
    p.add_argument("--output-uri", default=None, help="where checkpoints go (local or s3://)")
    p.add_argument("--model", default=None, help="model folder, checkpoint URI or HF model id")
    p.add_argument("--max-steps", type=int, default=None, help="override max_steps (smoke runs)")
    p.add_argument(
        "--launcher",
        choices=["auto", "inprocess", "torchrun", "deepspeed"],
        default="auto",
        help="auto = torchrun with one process per GPU (1 on CPU)",
    )
    p.add_argument("--processes", type=int, default=None, help="processes on this node (default: GPUs)")
    p.add_argument(
        "--launch-line",
        type=int,
        metavar="NUM_GPUS",
        default=None,
        help="print the command for NUM_GPUS per node (with --nodes) instead of running",
    )
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--master-addr", default=None)
    p.add_argument("--hostfile", default=None)
    p.add_argument("--config-out", default=None, help="with --launch-line: where the resolved config goes")
    p.add_argument("--print-deepspeed-config", action="store_true", help="print the DeepSpeed JSON and exit")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--force",
        action="store_true",
        help="OUTPUT holds a finished training with other settings: train these into OUTPUT-<config hash> "
        "(the old model is kept). Without it such a job is refused, naming the settings that differ; "
        "the same settings train nothing, a larger --max-steps extends the finished run",
    )
    p.set_defaults(func=_train)

    p = subparsers.add_parser(
        "tiny-model", help="build a tiny random Qwen model + tokenizer offline (demo/tests)"
    )
    p.add_argument("out_dir")
    p.add_argument("--vl", action="store_true", help="Qwen2.5-VL instead of a text LM")
    p.set_defaults(func=_tiny)


def _train(args: argparse.Namespace) -> int:
    from octomed_data.job_config import TrainConfig, load_yaml_config

    overrides = {
        "max_steps": args.max_steps,
        "train_data": args.train_data,
        "output_uri": args.output_uri,
        "model_path": args.model,
    }
    config = load_yaml_config(args.config, TrainConfig, overrides)
    if args.print_deepspeed_config:
        from training.deepspeed_config import deepspeed_config

        print(json.dumps(deepspeed_config(config), indent=2))
        return 0
    if args.launch_line is not None:
        from training.launch import launch_command

        config_path = args.config
        if args.train_data or args.output_uri or args.model or args.max_steps:
            # Every node must run the same resolved config: write it out and launch that.
            import yaml

            config_path = args.config_out or f"train-{config.config_hash()}.yaml"
            with open(config_path, "w", encoding="utf-8") as fh:
                yaml.safe_dump(config.model_dump(mode="json"), fh, sort_keys=False)
            print(f"resolved config written to {config_path} (copy it to every node)", file=sys.stderr)
        launcher = "deepspeed" if args.launcher in ("auto", "deepspeed") else args.launcher
        cmd = launch_command(
            config_path,
            num_gpus=args.launch_line,
            num_nodes=args.nodes,
            launcher=launcher,
            master_addr=args.master_addr,
            hostfile=args.hostfile,
        )
        print(shlex.join(cmd))
        return 0
    import tempfile

    from training.launch import launch_training

    work = config.work_dir or tempfile.mkdtemp(prefix="octomed-train-")
    result = launch_training(
        config,
        work_dir=f"{work}/job",
        launcher=args.launcher,
        processes=args.processes,
        on_line=lambda line: print(line, file=sys.stderr),
        progress=not args.no_progress,
        force=args.force,
    )
    print(json.dumps(result))
    return 0


def _tiny(args: argparse.Namespace) -> int:
    from training.tiny import build_text_model, build_vl_model

    print((build_vl_model if args.vl else build_text_model)(args.out_dir))
    return 0
