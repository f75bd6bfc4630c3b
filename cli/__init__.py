"""The ``octomed-data`` command line: every argparse parser of the project lives in this package.

One module per command group; each module listed in ``COMMAND_MODULES`` defines
``register(subparsers)`` and sets ``func`` on its parsers. The library modules the commands drive
never import argparse, and the handlers import Prefect flows, Ray, training and evaluation only
inside the function that runs the command, so ``octomed-data --help`` stays fast. User errors
(:class:`~octomed_data.errors.OctomedError`) print one ``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

from octomed_data.errors import OctomedError

COMMAND_MODULES = [
    "cli.ingest",  # ingest
    "cli.decontam",  # decontaminate, registry
    "cli.distill",  # distill, filter-difficulty
    "cli.sandbox",  # sandbox-teacher
    "cli.vllm",  # vllm setup, vllm serve
    "cli.mixture",  # mix, export
    "cli.release",  # release
    "cli.run",  # demo, run, rerun, serve, deployments (drive the Prefect flows)
    "cli.refilter",  # refilter (judge a run's stored replies again)
    "cli.train",  # train, tiny-model
    "cli.eval",  # eval
    "cli.experiment",  # experiment (the recipe lab)
    "cli.rl",  # rl (GRPO after SFT)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="octomed-data",
        description="OctoMed data factory: ingest, decontaminate, distill, mix, export, train.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a Prefect cancel, ``kill PID``, ``docker stop``) as an interrupt of the main thread:
    the attempt in progress unwinds like on Ctrl-C, so its record ends FAILED (never RUNNING) and
    its lease is released; the command exits 143."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # botocore announces where it found credentials at INFO: noise, and names the credential source.
    for noisy in ("botocore", "aiobotocore", "s3fs", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except OctomedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("error: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose or os.environ.get("OCTOMED_TRACEBACK"):
            raise
        print(f"error: {type(exc).__name__}: {exc} (run with -v for the traceback)", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
