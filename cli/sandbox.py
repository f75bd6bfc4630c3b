"""``octomed-data sandbox-teacher``: run the loopback sandbox teacher (not a model) until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict

from octomed_data.errors import ConfigError
from octomed_data.sandbox import FaultConfig, build_app


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sandbox-teacher",
        help="run the loopback OpenAI-compatible sandbox teacher (not a model: labelled fake traces)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--style", choices=["reasoning_content", "think", "mixed"], default="mixed")
    p.add_argument("--faults", default=None, help="JSON FaultConfig, e.g. '{\"rate_limited\": 0.1}'")
    p.add_argument("--no-log", action="store_true", help="keep counts only (long benchmarks)")
    p.add_argument(
        "--continuation-as-reasoning",
        action="store_true",
        help="return message continuations as reasoning_content (vLLM --reasoning-parser deepseek_r1)",
    )
    p.add_argument(
        "--server",
        choices=["generic", "vllm", "llamacpp"],
        default="generic",
        help="answer as this kind of server where kinds differ (/version, n, top_k validation)",
    )
    p.add_argument(
        "--reasoning-field",
        choices=["reasoning_content", "reasoning"],
        default="reasoning_content",
        help="the field separated reasoning arrives in (vLLM >= 0.10 and SGLang: reasoning)",
    )
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="requests served at once (each taking --latency-ms); more queue, like a GPU server's batch slots",
    )
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from aiohttp import web

    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ConfigError("--max-concurrency must be at least 1")
    try:
        faults = FaultConfig(**json.loads(args.faults)) if args.faults else FaultConfig()
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid --faults: {exc}") from None
    app = build_app(
        latency_s=args.latency_ms / 1000.0,
        faults=faults,
        style=args.style,
        log_requests=not args.no_log,
        continuation_as_reasoning=args.continuation_as_reasoning,
        server=args.server,
        reasoning_field=args.reasoning_field,
        max_concurrency=args.max_concurrency,
    )

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
        port = runner.addresses[0][1]
        # Parents (benchmarks, demos) wait for this line to know the port.
        print(f"sandbox teacher listening on http://{args.host}:{port}/v1", flush=True)
        print(json.dumps({"faults": asdict(faults)}), file=sys.stderr, flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    asyncio.run(serve())
    return 0
