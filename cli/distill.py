"""``octomed-data distill`` and ``filter-difficulty``: the engine against any OpenAI-compatible server.

    octomed-data distill QUESTIONS_URI --base-url URL --model NAME [--samples 16] --out URI
    octomed-data distill QUESTIONS_URI --endpoint URL1 --endpoint URL2 --model NAME --out URI  (a fleet)

The key is read from ``OPENAI_API_KEY`` (or ``--api-key-env VAR``) and never printed. With
``--config YAML`` the teachers, routing and prices come from the file. ``--estimate`` projects
the run's cost and duration from a small sample and stops (batch-mode teachers with the requests
that will really be batched: :func:`octomed_data.distill.batch.batch_estimate`). Re-running the same
command resumes: stored samples are not requested again. The last line states the cost from
``OUT/cost.json``, marked SIMULATED when sandbox replies were priced.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from octomed_data import storage
from octomed_data.config import first_error
from octomed_data.cost import cost_line
from octomed_data.distill import estimate
from octomed_data.errors import ConfigError
from octomed_data.inference.client import TeacherUnreachable
from octomed_data.layout import DifficultyFolder
from octomed_data.teachers import DistillConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "distill",
        help="sample N teacher traces per question, verify answers, write OUT/raw and OUT/accepted",
    )
    p.add_argument("questions_uri", help="questions dataset (ingest / decontaminate output)")
    p.add_argument("--out", required=True, help="output URI (OUT/raw, OUT/accepted, OUT/stats.json ...)")
    p.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument(
        "--endpoint",
        action="append",
        default=None,
        metavar="URL",
        help="a replica of the teacher (repeat for a fleet): least-loaded routing, dead replicas taken out",
    )
    p.add_argument("--model", help="model name to request")
    p.add_argument("--samples", type=int, default=None, help="samples per question (default 16)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    p.add_argument("--teacher-name", default=None, help="teacher name stored in samples (default: model)")
    p.add_argument("--config", help="YAML DistillConfig (teachers, routing, prices, limits)")
    p.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="ray",
        help="ray: async actors on local Ray (or --address); local: one asyncio loop in this process",
    )
    p.add_argument("--address", default=None, help="Ray address for --executor ray (ray://..., auto)")
    p.add_argument("--shards", nargs="+", default=None, help="only these question shards")
    p.add_argument("--max-in-flight", type=int, default=None)
    p.add_argument("--max-attempts", type=int, default=None)
    p.add_argument("--rpm", type=int, default=None, help="requests per minute for the teacher")
    p.add_argument("--max-tokens", type=int, default=None, help="completion budget per sample (default 8192)")
    p.add_argument(
        "--server",
        choices=["auto", "openai", "deepseek", "vllm", "sglang", "llamacpp", "generic"],
        default=None,
        help="the teacher's server kind: which sampling fields it takes, whether it honours n "
        "(default auto: asked once from the server)",
    )
    p.add_argument(
        "--seed-policy",
        choices=["per_sample", "off"],
        default=None,
        help="send each sample's seed (default) or none (servers that crash on seeds); resume stays exact",
    )
    p.add_argument("--estimate", action="store_true", help="project cost and duration, then stop")
    p.add_argument("--estimate-questions", type=int, default=20)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cli)
    _register_filter_difficulty(subparsers)


def build_config(args: argparse.Namespace) -> DistillConfig:
    """A config from ``--config`` and/or the single-teacher flags (flags override the file)."""
    data: dict[str, Any] = {}
    if args.config:
        data = DistillConfig.from_yaml(args.config).public_dict()
    teacher_flags = {
        "base_url": args.base_url,
        "model": args.model,
        "max_in_flight": args.max_in_flight,
        "rpm": args.rpm,
        "max_tokens": args.max_tokens,
        "server": args.server,
        "seed_policy": args.seed_policy,
        "endpoints": args.endpoint,
    }
    if not data:
        if not (args.base_url or args.endpoint) or not args.model:
            raise ConfigError("give --base-url and --model (or --endpoint URL per replica, or --config FILE)")
        name = args.teacher_name or re.sub(r"[^A-Za-z0-9_.\-]+", "-", args.model).strip("-") or "teacher"
        data = {"teachers": [{"name": name, "api_key_env": args.api_key_env}]}
    elif len(data["teachers"]) == 1:
        if args.teacher_name:
            teacher_flags["name"] = args.teacher_name
        if args.api_key_env != "OPENAI_API_KEY":
            teacher_flags["api_key_env"] = args.api_key_env
    elif any(v is not None for v in teacher_flags.values()):
        raise ConfigError(
            "--base-url/--endpoint/--model/--max-in-flight/--rpm/--max-tokens/--server/--seed-policy need a config "
            "with exactly one teacher"
        )
    if len(data["teachers"]) == 1:
        teacher = data["teachers"][0]
        if args.base_url and not args.endpoint:
            teacher["endpoints"] = []  # one URL on the command line replaces a config's fleet
        if args.endpoint and not args.base_url:
            teacher["base_url"] = None  # the fleet's first replica
        teacher.update({k: v for k, v in teacher_flags.items() if v is not None})
    if args.samples is not None:
        data["samples"] = args.samples
    if args.max_attempts is not None:
        data["max_attempts"] = args.max_attempts
    return DistillConfig.parse(data, where=args.config or "command line")


def _cli(args: argparse.Namespace) -> int:
    config = build_config(args)
    if args.estimate:
        from octomed_data.distill.batch import batch_estimate

        result = estimate(args.questions_uri, config, sample_questions=args.estimate_questions, out=args.out)
        print(json.dumps(batch_estimate(result, config, args.out), indent=2))
        return 0
    from octomed_data.stages.distill_run import asked_shards, run_distill, run_local

    if args.executor == "ray":
        # The Ray executor lives outside the library (tasks/); loaded only when asked for.
        from tasks.ray_executor import RayExecutor

        asked_shards(args.questions_uri, args.shards)  # no committed shard: one error line, before Ray starts
        executor = RayExecutor(args.address, progress=not args.no_progress)
        summary = run_distill(args.questions_uri, args.out, config, executor, shards=args.shards)
    else:
        summary = run_local(
            args.questions_uri, args.out, config, shards=args.shards, progress=not args.no_progress
        )
    print(json.dumps({k: v for k, v in summary.items() if k != "shards"}, indent=2))
    line = (
        f"distilled {summary['questions']} questions: "
        f"{summary['stored']}/{summary['expected']} samples stored "
        f"({summary['new_samples']} new, {summary['stored_before']} already stored), "
        f"{summary['accepted']} accepted, {summary['failed']} failed, {summary['requests']} requests"
    )
    if summary.get("cost_uri") and storage.exists(summary["cost_uri"]):
        line += f"; {cost_line(storage.read_json(summary['cost_uri']))}"
    print(line, file=sys.stderr)
    from octomed_data.stages.committed import not_committed_line

    missing = summary["not_committed"]
    if summary.get("aborted"):
        shards = f"; {not_committed_line('distill', missing, summary['asked'])}" if missing else ""
        raise TeacherUnreachable(f"{summary['aborted']}{shards}")
    if missing:
        # One line: the asked-for shards that are not committed and why (failed samples, the lease
        # held by another run or lost mid-shard, the store unreachable); never exit 0 without them.
        line = not_committed_line("distill", missing, summary["asked"])
        print(f"error: {line}; run the same command again to complete exactly those", file=sys.stderr)
        return 1
    return 0


def _register_filter_difficulty(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "filter-difficulty",
        help="optional: keep questions whose LLM difficulty score (1-10) lies in [--low, --high]",
    )
    p.add_argument("questions_uri", help="questions dataset to filter")
    p.add_argument("--out", required=True, help="OUT: grading state and scores (OUT/difficulty/...)")
    p.add_argument("--filtered", default=None, help="kept questions (default OUT/questions)")
    p.add_argument("--base-url", required=True, help="OpenAI-compatible endpoint of the grader")
    p.add_argument("--model", required=True, help="grader model name")
    p.add_argument("--low", type=int, required=True, help="lowest kept score (1-10)")
    p.add_argument("--high", type=int, required=True, help="highest kept score (1-10)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    p.add_argument("--grader-name", default=None, help="grader name stored with scores (default: model)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=2048, help="raise for reasoning models")
    p.add_argument("--max-in-flight", type=int, default=64)
    p.add_argument("--rpm", type=int, default=None, help="requests per minute for the grader")
    p.add_argument("--max-attempts", type=int, default=6)
    p.add_argument("--shards", nargs="+", default=None, help="only these question shards")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cli_filter_difficulty)


def _cli_filter_difficulty(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from octomed_data.stages.difficulty import filter_by_difficulty
    from octomed_data.teachers import TeacherConfig

    name = args.grader_name or re.sub(r"[^A-Za-z0-9_.\-]+", "-", args.model).strip("-") or "grader"
    try:
        grader = TeacherConfig(
            name=name,
            base_url=args.base_url,
            model=args.model,
            api_key_env=args.api_key_env,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            max_in_flight=args.max_in_flight,
            rpm=args.rpm,
        )
    except ValidationError as exc:
        raise ConfigError(f"invalid grader: {first_error(exc)}") from None
    filtered = args.filtered or DifficultyFolder(args.out).filtered
    result = filter_by_difficulty(
        args.questions_uri,
        args.out,
        filtered,
        teacher=grader,
        low=args.low,
        high=args.high,
        shards=args.shards,
        max_attempts=args.max_attempts,
        progress=not args.no_progress,
    )
    print(json.dumps(result, indent=2))
    print(
        f"graded {sum(result[k] for k in ('kept', 'dropped', 'unscored', 'failed'))} questions: "
        f"{result['kept']} kept, {result['dropped']} dropped, {result['unscored']} unscored, "
        f"{result['failed']} failed ({result['new_scores']} new scores, {result['stored_before']} already "
        f"stored, {result['requests']} requests)",
        file=sys.stderr,
    )
    if result["aborted"]:
        raise TeacherUnreachable(result["aborted"])
    if result["failed"]:
        print(
            f"error: {result['failed']} questions could not be graded after all attempts "
            f"(shards not written: {', '.join(result['incomplete_shards'])}); run the same command again",
            file=sys.stderr,
        )
        return 1
    if result["incomplete_shards"]:  # not graded here: another run held the lease, the store failed ...
        from octomed_data.stages.committed import not_committed_line

        missing = {s: attempt_reason(args.out, "difficulty", s) for s in result["incomplete_shards"]}
        line = not_committed_line("difficulty", missing, len(result["shards"]))
        print(f"error: {line}; run the same command again to complete exactly those", file=sys.stderr)
        return 1
    return 0


def attempt_reason(out: str, stage: str, shard: str) -> str:
    """Why ``shard`` is not committed, as its last attempt record says (for the message only)."""
    from octomed_data.layout import RunPaths
    from octomed_data.stages.committed import NOT_DONE, reason

    uri = RunPaths.at(out).state_uri(stage, shard)
    try:
        record = storage.read_json(uri) if storage.exists(uri) else {}
    except Exception:  # unreadable record (the store itself may be the problem)
        record = {}
    return (
        reason(record["error"])
        if record.get("state") in ("FAILED", "CANCELLED") and record.get("error")
        else NOT_DONE
    )
