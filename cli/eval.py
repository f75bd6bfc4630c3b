"""``octomed-data eval``: the one evaluation command.

A model on held-out benchmarks (``--benchmarks``) or on a question dataset (``--questions``), from
flags alone or from an :class:`~octomed_data.job_config.EvalConfig` YAML (``--config``) that flags given
alongside override. Protocol defaults are the paper's (T=0.6, top-p 0.95, 5 seeds, 8192 tokens).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from octomed_data.errors import ConfigError
from octomed_data.job_config import EvalConfig

# Flags that map one-to-one onto EvalConfig fields (argparse dest = field name).
_FIELD_FLAGS = (
    "model", "benchmarks", "questions_uri", "output_uri", "backend", "data_dir", "seeds", "max_new_tokens",
    "temperature", "top_p", "prompting", "limit", "api_key_env", "served_model_name", "max_in_flight",
    "batch_size", "sampling_extras", "max_request_error_rate", "server",
)  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval`` to the ``octomed-data`` parser."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on medical benchmarks or a question dataset "
        "(paper protocol: T=0.6, top-p 0.95, 5 seeds, 8192 tokens)",
    )
    add_eval_arguments(p)
    p.set_defaults(func=_eval)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The ``eval`` command's flags (protocol defaults are the paper's; see EvalConfig)."""
    p.add_argument("--config", default=None, help="EvalConfig YAML (local path or URI); flags override it")
    p.add_argument("--model", help="local model folder, s3:// or file:// checkpoint, or http(s) endpoint URL")
    p.add_argument("--benchmarks", help="comma-separated registry names (see --list)")
    p.add_argument(
        "--questions",
        dest="questions_uri",
        default=None,
        help="a QUESTION_SCHEMA dataset instead of benchmarks",
    )
    p.add_argument("--out", dest="output_uri", help="output folder (local or s3://)")
    p.add_argument("--list", action="store_true", help="list the benchmark registry and exit")
    p.add_argument("--backend", choices=["auto", "hf", "openai", "vllm"], default=None)
    p.add_argument(
        "--data-dir", default=None, help="benchmark files (default $OCTOMED_EVAL_DATA or ../shared/data)"
    )
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (default 8192)")
    p.add_argument("--temperature", type=float, default=None, help="default 0.6")
    p.add_argument("--top-p", type=float, default=None, help="default 0.95")
    p.add_argument("--prompting", choices=["cot", "direct"], default=None)
    p.add_argument("--limit", type=int, default=None, help="first N items per benchmark")
    p.add_argument("--api-key-env", default=None, help="NAME of the env var holding the endpoint's key")
    p.add_argument(
        "--served-model-name", default=None, help="model name at the endpoint (default: first listed)"
    )
    p.add_argument(
        "--max-in-flight",
        "--concurrency",  # the old name, kept working
        dest="max_in_flight",
        type=int,
        default=None,
        help="openai: requests in flight (default 32)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="hf: sequences per generate call (default 8)")
    p.add_argument(
        "--no-force-end", action="store_true", help="do not force the end of thinking at the budget"
    )
    p.add_argument("--prefill-think", action="store_true", help="open every reply with <think>")
    p.add_argument(
        "--sampling-extras",
        choices=["auto", "on", "off"],
        default=None,
        help="openai: switch top-k and repetition penalty off explicitly, spelled as the server kind "
        "accepts (vLLM top_k=-1, llama.cpp top_k=0) so the server does not use the checkpoint's "
        "generation_config; auto = where the server kind takes them, on = also for unknown servers",
    )
    p.add_argument(
        "--server",
        choices=["auto", "openai", "deepseek", "vllm", "sglang", "llamacpp", "generic"],
        default=None,
        help="openai: the endpoint's server kind (default auto: asked once from the server)",
    )
    p.add_argument(
        "--max-request-error-rate",
        type=float,
        default=None,
        help="fail the run when more replies than this share had a request error (default 0.05)",
    )
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """An EvalConfig from the ``eval`` flags, over ``--config`` when given (unset flags keep the
    file's values, then the protocol defaults)."""
    from octomed_data.job_config import load_yaml_config, validate_config

    flags: dict[str, Any] = {key: getattr(args, key) for key in _FIELD_FLAGS}
    if args.no_force_end:
        flags["force_end_of_thinking"] = False
    if args.prefill_think:
        flags["prefill_think"] = True
    if args.config:
        return load_yaml_config(args.config, EvalConfig, flags)
    if not args.model:
        raise ConfigError("--model is required (a model folder, checkpoint URI or endpoint URL), or --config")
    if not args.benchmarks and not args.questions_uri:
        raise ConfigError(
            "--benchmarks (comma-separated; see `octomed-data eval --list`) or --questions is required"
        )
    data = {k: v for k, v in flags.items() if v is not None}
    return validate_config(EvalConfig, data, where="eval flags")


def list_text(data_dir: str | None) -> str:
    """The registry as a text table for ``eval --list``."""
    from evaluation.benchmarks import list_benchmarks

    rows = list_benchmarks(data_dir)
    out = [f"{'name':<18} {'present':<8} {'images':<7} {'paper':>6}  title"]
    for r in rows:
        paper = f"{r['paper_octomed_7b']:.2f}" if r["paper_octomed_7b"] is not None else "-"
        images = "n/a" if not r["images"] else ("yes" if r["images_present"] else "no")
        out.append(
            f"{r['name']:<18} {'yes' if r['present'] else 'no':<8} {images:<7} {paper:>6}  {r['title']}"
        )
    return "\n".join(out)


def _eval(args: argparse.Namespace) -> int:
    from evaluation.harness import evaluate

    if args.list:
        print(list_text(args.data_dir))
        return 0
    result = evaluate(config_from_args(args), progress=not args.no_progress)
    print(json.dumps(result.to_dict()))
    return 0
