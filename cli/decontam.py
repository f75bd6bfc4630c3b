"""The ``decontaminate`` command and the ``registry`` command group (build / show / index)."""

from __future__ import annotations

import argparse
import time

from octomed_data.decontam.index import (
    DEFAULT_PHASH_THRESHOLD,
    SHORT_MATCH_MODES,
    DecontamError,
    DecontamIndex,
)
from octomed_data.layout import RunPaths
from octomed_data.registry import build_registry, load_registry, registry_counts, write_registry
from octomed_data.stages.base import StageFailed
from octomed_data.stages.committed import reraise_with_reasons
from octomed_data.stages.decontaminate import decontaminate


def _cmd_decontaminate(args: argparse.Namespace) -> int:
    if args.phash_threshold < 0 or args.phash_threshold > 64:
        raise DecontamError("--phash-threshold must be between 0 and 64")
    index = None
    if args.index:
        index = DecontamIndex.load(args.index)
    started = time.time()
    try:
        result = decontaminate(
            args.questions_uri,
            args.out,
            registry=args.registry,
            index=index,
            phash_threshold=args.phash_threshold,
            short_match=args.short_match,
            progress=not args.quiet,
        )
    except StageFailed as exc:  # one line: every shard not committed, and why
        reraise_with_reasons(exc, RunPaths.at(args.out), "decontaminate", started)
    print(f"questions: {result.input}  kept: {result.kept}  removed: {result.removed}")
    for name, n in result.by_benchmark.items():
        print(f"  removed for {name}: {n}")
    for kind, n in result.by_kind.items():
        print(f"  removed by {kind}: {n}")
    print(f"kept    -> {result.kept_uri}")
    print(f"removed -> {result.removed_uri}")
    return 0


def _cmd_registry_build(args: argparse.Namespace) -> int:
    table = build_registry(args.data_dir, progress=not args.quiet)
    size = write_registry(table, args.out)
    print(f"wrote {table.num_rows} registry rows ({size / 1e6:.2f} MB) -> {args.out}")
    return 0


def _cmd_registry_show(args: argparse.Namespace) -> int:
    table = load_registry(args.registry)
    counts = registry_counts(table)
    print(f"{'benchmark':<22}{'items':>8}{'rows':>8}{'images':>8}")
    for name, c in counts.items():
        print(f"{name:<22}{c['items']:>8}{c['rows']:>8}{c['images']:>8}")
    total = {k: sum(c[k] for c in counts.values()) for k in ("items", "rows", "images")}
    print(f"{'total':<22}{total['items']:>8}{total['rows']:>8}{total['images']:>8}")
    return 0


def _cmd_registry_index(args: argparse.Namespace) -> int:
    index = DecontamIndex.from_registry(args.registry, short_match=args.short_match)
    index.save(args.out)
    print(f"wrote {index!r} -> {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``decontaminate`` and the ``registry`` command group to the CLI."""
    p = subparsers.add_parser(
        "decontaminate",
        help="remove questions that overlap held-out benchmarks (16-gram text, image hashes)",
        description="Writes kept questions to OUT/questions and removed ones to OUT/removed.",
    )
    p.add_argument(
        "questions_uri", metavar="QUESTIONS_URI", help="question dataset (or an ingest output root)"
    )
    p.add_argument("--out", required=True, help="output root URI")
    p.add_argument("--registry", help="registry pack (default: the bundled one)")
    p.add_argument("--index", help="a saved index (from `registry index`) instead of building one")
    p.add_argument("--phash-threshold", type=int, default=DEFAULT_PHASH_THRESHOLD, help="max pHash distance")
    p.add_argument(
        "--short-match", choices=SHORT_MATCH_MODES, default="item", help="rule for items < 16 tokens"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_decontaminate)

    reg = subparsers.add_parser("registry", help="the benchmark registry (held-out test items)")
    rsub = reg.add_subparsers(dest="registry_command", metavar="ACTION")
    b = rsub.add_parser("build", help="build a registry pack from benchmark files")
    b.add_argument("--data-dir", required=True, help="folder laid out like ../shared/data")
    b.add_argument("--out", required=True, help="output Parquet path or URI")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_registry_build)
    s = rsub.add_parser("show", help="items per benchmark in a registry pack")
    s.add_argument("--registry", help="registry pack (default: the bundled one)")
    s.set_defaults(func=_cmd_registry_show)
    i = rsub.add_parser("index", help="build the decontamination index once and save it for shard workers")
    i.add_argument("--registry", help="registry pack (default: the bundled one)")
    i.add_argument("--out", required=True, help="index URI (.npz)")
    i.add_argument("--short-match", choices=SHORT_MATCH_MODES, default="item")
    i.set_defaults(func=_cmd_registry_index)
