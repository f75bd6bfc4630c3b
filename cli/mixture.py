"""``octomed-data mix`` and ``octomed-data export``: the training mixture and its exports."""

from __future__ import annotations

import argparse
import json

from octomed_data.config import first_error
from octomed_data.errors import ConfigError
from octomed_data.mixture import MixtureConfig, parse_weights


def _cmd_mix(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        config = MixtureConfig(
            weights=parse_weights(args.weight),
            caps=parse_weights(args.cap, int),
            max_traces_per_question=args.max_per_question,
            seed=args.seed,
            validation_fraction=args.validation_fraction,
            shard_rows=args.shard_rows,
            exclude_audit_flags=args.exclude_audit_flag or [],
        )
    except ValidationError as exc:
        raise ConfigError(f"invalid mixture settings: {first_error(exc)}") from None
    from octomed_data.stages.committed import run_global_step
    from octomed_data.stages.folder_steps import FolderMixtureStage

    stage = FolderMixtureStage(
        args.accepted, args.questions, args.out, config, audit=args.audit, progress=True
    )
    print(json.dumps(run_global_step(stage), indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from octomed_data.stages.committed import run_global_step
    from octomed_data.stages.folder_steps import FolderExportStage

    settings = {
        "formats": args.format,
        "embed_images": not args.no_embed,
        "llamafactory_images": args.llamafactory_images,
        "answer_format": args.answer_format,
    }
    print(
        json.dumps(
            run_global_step(FolderExportStage(args.mixture, args.out, settings, progress=True)), indent=2
        )
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """``octomed-data mix`` and ``octomed-data export``."""
    p = subparsers.add_parser("mix", help="build the training mixture from accepted traces")
    p.add_argument("--accepted", nargs="+", required=True, help="accepted-sample dataset URI(s)")
    p.add_argument("--questions", nargs="+", required=True, help="question dataset URI(s)")
    p.add_argument("--out", required=True, help="mixture output URI")
    p.add_argument("--weight", action="append", metavar="SOURCE=W", help="per-source weight (repeatable)")
    p.add_argument("--cap", action="append", metavar="SOURCE=N", help="per-source cap (repeatable)")
    p.add_argument("--max-per-question", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--validation-fraction", type=float, default=0.05)
    p.add_argument("--shard-rows", type=int, default=5000)
    p.add_argument(
        "--exclude-audit-flag",
        action="append",
        choices=["suspected_label_error", "never_correct"],
        help="leave out questions the filter's gold-label audit flagged so (repeatable)",
    )
    p.add_argument(
        "--audit", nargs="+", default=None, help="the audit dataset of each --accepted (default: beside it)"
    )
    p.set_defaults(func=_cmd_mix)

    e = subparsers.add_parser("export", help="export a mixture to LLaMA-Factory and TRL Parquet")
    e.add_argument("mixture", help="mixture URI (holds train/ and validation/)")
    e.add_argument("--out", required=True, help="export output URI")
    e.add_argument(
        "--format", action="append", choices=["llamafactory", "trl"], help="default: both (repeatable)"
    )
    e.add_argument("--no-embed", action="store_true", help="TRL: reference images by URI, don't embed bytes")
    e.add_argument(
        "--llamafactory-images",
        choices=["relative", "absolute"],
        default="relative",
        help="relative: copy/link images into the export (default); absolute: the run's paths (shared FS)",
    )
    e.add_argument(
        "--answer-format",
        choices=["normalize", "as_is"],
        default="normalize",
        help="normalize: replies end in the system prompt's answer line (default); as_is: keep replies, "
        "system prompt states no format",
    )
    e.set_defaults(func=_cmd_export)
