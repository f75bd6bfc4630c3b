"""``octomed-data ingest FORMAT INPUT --out URI``: read an upstream file, write questions + quarantine."""

from __future__ import annotations

import argparse
import sys
import time

from octomed_data.errors import ConfigError
from octomed_data.ingest import IngestResult
from octomed_data.layout import RunPaths
from octomed_data.sources import FORMATS
from octomed_data.stages.base import StageFailed
from octomed_data.stages.committed import reraise_with_reasons
from octomed_data.stages.ingest import ingest


def parse_options(pairs: list[str] | None) -> dict[str, str]:
    """``["per_class=50"]`` -> ``{"per_class": "50"}`` (the repeatable ``--option KEY=VALUE``)."""
    options: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option expects KEY=VALUE, got {pair!r}")
        options[key.strip()] = value.strip()
    return options


def summary_lines(result: IngestResult) -> list[str]:
    """Human-readable summary of a run (what the CLI prints)."""
    lines = [
        f"records: {result.records}  questions: {result.questions}  quarantined: {result.quarantined}"
        f"  ({result.seconds:.1f}s)",
    ]
    if len(result.per_source) > 1:
        for name, c in result.per_source.items():
            lines.append(
                f"  {name}: {c['records']} records -> {c['questions']} questions, {c['quarantined']} quarantined"
            )
    if result.reasons:
        lines.append("quarantine reasons: " + ", ".join(f"{k}={v}" for k, v in result.reasons.items()))
    if result.cleaned:
        lines.append("cleaned: " + ", ".join(f"{k}={v}" for k, v in result.cleaned.items()))
    lines.append(f"questions:  {result.questions_uri}  ({len(result.shards)} shards)")
    lines.append(f"quarantine: {result.quarantine_uri}  ({len(result.quarantine_shards)} shards)")
    lines.append(
        f"images:     {result.images_uri}  ({result.images_stored} new, {result.images_decoded} decoded)"
    )
    return lines


def _run(args: argparse.Namespace) -> int:
    options = parse_options(args.option)
    if args.split:
        options["split"] = args.split
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    started = time.time()
    try:
        result = ingest(
            args.format,
            args.input,
            args.out,
            images=args.images,
            shard_size=args.shard_size,
            progress=progress,
            shard_prefix=args.shard_prefix,
            **options,
        )
    except StageFailed as exc:  # one line: every shard not committed, and why
        reraise_with_reasons(exc, RunPaths.at(args.out), "ingest", started)
    print("\n".join(summary_lines(result)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``octomed-data ingest FORMAT INPUT --out URI ...``."""
    p = subparsers.add_parser(
        "ingest",
        help="read an upstream dataset file as FORMAT; write questions + quarantine as Parquet",
        description="Formats: " + ", ".join(FORMATS),
    )
    p.add_argument("format", metavar="FORMAT", help="one of: " + ", ".join(FORMATS))
    p.add_argument(
        "input",
        metavar="INPUT",
        help="input file or folder: a path, file:// or s3://... URI (hf: also a cached hub dataset id)",
    )
    p.add_argument(
        "--out", required=True, metavar="URI", help="output root: path, file:// or s3://bucket/prefix"
    )
    p.add_argument(
        "--images", metavar="DIR", help="folder (path or URI) that image references resolve against"
    )
    p.add_argument("--shard-size", type=int, default=5000, metavar="N", help="rows per Parquet shard (5000)")
    p.add_argument("--split", help="override the split written to every row")
    p.add_argument("--shard-prefix", help="name shards <prefix>-00000 (several ingests into one --out)")
    p.add_argument(
        "--option", action="append", metavar="KEY=VALUE", help="format option, e.g. per_class=50 (repeatable)"
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    p.set_defaults(func=_run)
