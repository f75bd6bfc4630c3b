"""The RL data: prompts with gold answers for reinforcement learning after SFT (``rl/data``).

:func:`build_rl_data` reads the run's decontaminated questions (``decontaminate/questions``) and the
filter's verdicts (``filter/verdicts``) shard by shard (one questions shard and its verdicts in
memory at a time) and writes ``rl/data/{train,validation}`` (:data:`RL_SCHEMA`, one output shard per
questions shard) and ``rl/data/rl_data.json`` (counts per source).

A question's **pass rate** is accepted / judged teacher samples (failed requests are no samples,
as in the statistics). Each question lands in exactly one bucket, checked in this order:

* ``decontam_removed``: in ``decontaminate/removed`` (never in ``questions``; checked all the same);
* ``benchmark_excluded``: the decontamination registry matches it (the release's check,
  ``DecontamIndex.check_table``; the run's registry and thresholds), whatever the run's
  decontamination did;
* ``unjudged``: no judged sample (no pass rate);
* ``out_of_band``: its pass rate is outside the band (default (0, 1), both ends excluded: a
  question every sample solved, or none did, gives GRPO's group-relative advantage nothing);
* ``weighted_out``: its source's weight (< 1) left it out, a seeded hash of the question as in the
  mixture;
* ``capped``: beyond ``max_prompts`` (the prompts with the smallest seeded hash are kept);
* ``selected``: written, to ``train`` or ``validation`` by a seeded hash of the question (the
  mixture's :func:`~octomed_data.mixture_select.split_of`), so no question is in both.

The prompt is the SFT student's: the export's system prompt (the run's ``export.answer_format``)
and user turn (:mod:`octomed_data.export_turns`), text only in ``content``; a question's images are
its URIs in the run's image store (``images``), in order.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow as pa

from octomed_data import storage
from octomed_data.errors import ConfigError, StorageError
from octomed_data.export_turns import escape_placeholders, export_system_prompt, user_text
from octomed_data.layout import RLFolder, RunPaths
from octomed_data.mixture_select import TWO64, h64, split_of
from octomed_data.rejection import FAILED
from octomed_data.rl.config import RLOptions
from octomed_data.schema import OPTION_TYPE, QUESTION_SCHEMA, VERDICT_SCHEMA

# 1: the first RL data (prompt = the SFT export's system + user turn).
RL_DATA_VERSION = "1"
SPLITS = ("train", "validation")
MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
RL_SCHEMA = pa.schema(
    [
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("task_type", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("prompt", pa.list_(MESSAGE_TYPE), nullable=False),
        pa.field("images", pa.list_(pa.string()), nullable=False),
        pa.field("gold_answer", pa.string(), nullable=False),
        # The question as the filter's judge is shown it (open answers in judge mode).
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer_text", pa.string()),
        pa.field("options", pa.list_(OPTION_TYPE), nullable=False),
        pa.field("pass_rate", pa.float64(), nullable=False),
        pa.field("samples", pa.int32(), nullable=False),
    ],
    metadata={"octomed.schema": "rl_prompt", "octomed.schema_version": RL_DATA_VERSION},
)
_INDEX: dict[tuple[str, str, int], Any] = {}  # (registry sha256, short_match, phash threshold) -> index
BUCKETS = (
    "decontam_removed",
    "benchmark_excluded",
    "unjudged",
    "out_of_band",
    "weighted_out",
    "capped",
    "selected",
)


def pass_rates(verdicts_uri: str, shard: str) -> dict[str, tuple[int, int]]:
    """question_id -> (judged samples, accepted samples) of one verdicts shard (failed requests excluded)."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    ds = storage.Dataset(verdicts_uri, VERDICT_SCHEMA)
    for batch in ds.iter_batches(columns=["question_id", "correct", "reject_reason"], shards=[shard]):
        for qid, correct, reason in zip(*(c.to_pylist() for c in batch.columns), strict=True):
            if reason == FAILED:
                continue
            c = out[qid]
            c[0] += 1
            c[1] += bool(correct)
    return {k: (v[0], v[1]) for k, v in out.items()}


def prompt_messages(row: Mapping[str, Any], answer_format: str = "normalize") -> list[dict[str, str]]:
    """The SFT student's prompt for a question row: the export's system prompt and user turn."""
    user, _ = escape_placeholders(user_text(row))
    return [
        {"role": "system", "content": export_system_prompt(row["task_type"], answer_format)},
        {"role": "user", "content": user},
    ]


def image_uris(row: Mapping[str, Any]) -> list[str]:
    """The question's images as URIs in the run's image store (a ``StorageError`` without one)."""
    out = []
    for im in row.get("images") or []:
        if not im.get("uri"):
            raise StorageError(
                f"question {row['question_id']}: image {im.get('sha256')} has no stored copy "
                "(ingested without an image store); RL needs the image"
            )
        out.append(im["uri"])
    return out


class _Selection:
    """What one build reads of the run besides the questions: settings, verdicts, registry, removed."""

    def __init__(self, paths: RunPaths, options: RLOptions, index: Any, removed: set[str]) -> None:
        self.paths = paths
        self.options = options
        self.index = index
        self.removed = removed
        self.cap_hash: int | None = None  # the largest cap hash kept under max_prompts

    def cap_key(self, qid: str) -> int:
        return h64(self.options.seed, "rl-cap", qid)

    def rows(self, shard: str) -> Iterator[tuple[str, dict[str, Any], tuple[int, int]]]:
        """(bucket, question row, (judged, accepted)) for every question of one shard."""
        rates = pass_rates(self.paths.verdicts, shard)
        table = storage.Dataset(self.paths.questions, QUESTION_SCHEMA).read_shard(shard)
        matches = self.index.check_table(table) if table.num_rows else []
        opts = self.options
        for i, q in enumerate(table.to_pylist()):
            qid = q["question_id"]
            judged, accepted = rates.get(qid, (0, 0))
            if qid in self.removed:
                bucket = "decontam_removed"
            elif matches[i] is not None:
                bucket = "benchmark_excluded"
            elif judged == 0:
                bucket = "unjudged"
            elif not opts.in_band(accepted / judged):
                bucket = "out_of_band"
            elif h64(opts.seed, "rl-weight", qid) / TWO64 >= opts.weight(q["source"]):
                bucket = "weighted_out"
            elif self.cap_hash is not None and self.cap_key(qid) > self.cap_hash:
                bucket = "capped"
            else:
                bucket = "selected"
            yield bucket, q, (judged, accepted)


def recipe_of(paths: RunPaths) -> Any:
    """The recipe the run recorded (``run.json``); the default recipe for a bare folder (tests, the lab)."""
    from octomed_data.recipe import Recipe
    from octomed_data.release_run import run_recipe

    return run_recipe(paths) if storage.exists(paths.run_json) else Recipe()


def registry_pack(paths: RunPaths) -> str:
    """The registry pack the run's decontamination checks against (the bundled one by default)."""
    from octomed_data.release_card import registry_uri

    return registry_uri(recipe_of(paths).decontam.registry)


def _registry_index(paths: RunPaths) -> tuple[Any, dict[str, Any]]:
    """The run's decontamination registry as an index (the release's), and what rl_data.json says of it."""
    from octomed_data.decontam.index import DecontamIndex
    from octomed_data.release_card import registry_info

    recipe = recipe_of(paths)
    table, info = registry_info(recipe.decontam.registry)
    key = (info["sha256"], recipe.decontam.short_match, recipe.decontam.phash_threshold)
    if key not in _INDEX:  # one index kept per process: a flow's repeated builds load it once
        _INDEX.clear()
        _INDEX[key] = DecontamIndex.from_registry(
            table, short_match=recipe.decontam.short_match, phash_threshold=recipe.decontam.phash_threshold
        )
    return _INDEX[key], info


def run_answer_format(paths: RunPaths) -> str:
    """The run's ``export.answer_format`` (what the SFT student's system prompt says); default normalize."""
    return recipe_of(paths).export.answer_format


def removed_ids(paths: RunPaths) -> set[str]:
    """The questions decontamination removed (a small set: benchmark matches)."""
    out: set[str] = set()
    for batch in storage.Dataset(paths.removed).iter_batches(columns=["question_id"]):
        out.update(batch.column(0).to_pylist())
    return out


def _inputs(paths: RunPaths) -> list[str]:
    """The questions shards, each with committed verdicts (else one ConfigError line)."""
    shards = storage.Dataset(paths.questions, QUESTION_SCHEMA).committed_names()
    if not shards:
        raise StorageError(f"no questions at {paths.questions}: run decontamination first")
    judged = set(storage.Dataset(paths.verdicts, VERDICT_SCHEMA).committed_names())
    missing = [s for s in shards if s not in judged]
    if missing:
        named = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ConfigError(
            f"run {paths.run_id}: questions shard(s) without verdicts ({named}): run the filter stage "
            "first (RL selects prompts by the filter's pass rates)"
        )
    return shards


def build_rl_data(
    paths: RunPaths, options: RLOptions, *, answer_format: str | None = None, index: Any = None
) -> dict[str, Any]:
    """Write ``rl/data/{train,validation}`` and ``rl_data.json``; returns the summary (see the module doc).

    ``answer_format``: the system prompt's (None: the run's ``export.answer_format``); ``index``:
    a :class:`~octomed_data.decontam.index.DecontamIndex` (None: the run's registry).
    """
    shards = _inputs(paths)
    registry: dict[str, Any] = {"registry": "given index"}
    if index is None:
        index, registry = _registry_index(paths)
    fmt = answer_format or run_answer_format(paths)
    sel = _Selection(paths, options, index, removed_ids(paths))
    if options.max_prompts is not None:  # a first pass: the max_prompts smallest cap hashes
        heap: list[int] = []
        for shard in shards:
            for bucket, q, _ in sel.rows(shard):
                if bucket != "selected":
                    continue
                key = -sel.cap_key(q["question_id"])
                if len(heap) < options.max_prompts:
                    heapq.heappush(heap, key)
                elif key > heap[0]:
                    heapq.heapreplace(heap, key)
        sel.cap_hash = -heap[0] if len(heap) >= options.max_prompts else None
    folder = RLFolder(paths.rl)
    targets = {s: storage.Dataset(folder.split(s), RL_SCHEMA) for s in SPLITS}
    per_source: dict[str, Counter[str]] = defaultdict(Counter)
    written: dict[str, list[str]] = {s: [] for s in SPLITS}
    for shard in shards:
        writers = {s: targets[s].writer(shard) for s in SPLITS}
        try:
            for bucket, q, (judged, accepted) in sel.rows(shard):
                counts = per_source[q["source"]]
                counts["candidates"] += 1
                counts[bucket] += 1
                if bucket != "selected":
                    continue
                split = split_of(q["question_id"], options.seed, options.validation_fraction)
                images = image_uris(q)
                counts[split] += 1
                counts["image" if images else "text"] += 1
                writers[split].add(
                    {
                        "question_id": q["question_id"],
                        "source": q["source"],
                        "task_type": q["task_type"],
                        "split": split,
                        "prompt": prompt_messages(q, fmt),
                        "images": images,
                        "gold_answer": q["answer"],
                        "question": q["question"],
                        "answer_text": q.get("answer_text"),
                        "options": q["options"],
                        "pass_rate": accepted / judged,
                        "samples": judged,
                    }
                )
            for w in writers.values():
                w.flush()
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        for split, w in writers.items():
            if w.rows:
                w.commit({"rl_data_version": RL_DATA_VERSION})
                written[split].append(shard)
            else:  # no prompt of this shard in this split: no file, and none left from an earlier build
                w.abort()
                targets[split].delete_shard(shard)
    for split in SPLITS:
        targets[split].drop_stale(keep=written[split])
    return _summary(paths, options, fmt, registry, per_source)


def _summary(
    paths: RunPaths,
    options: RLOptions,
    answer_format: str,
    registry: Mapping[str, Any],
    per_source: Mapping[str, Counter[str]],
) -> dict[str, Any]:
    keys = ("candidates", *BUCKETS, *SPLITS, "text", "image")
    sources = {s: {k: int(c[k]) for k in keys} for s, c in sorted(per_source.items())}
    totals = {k: sum(v[k] for v in sources.values()) for k in keys}
    if not totals["selected"]:
        raise ConfigError(
            f"run {paths.run_id}: no question is left for RL ({totals['candidates']} read: "
            f"{totals['out_of_band']} outside the pass-rate band, {totals['benchmark_excluded']} benchmark "
            f"items, {totals['unjudged']} unjudged, {totals['weighted_out']} weighted out)"
        )
    summary = {
        "rl_data_version": RL_DATA_VERSION,
        "settings": options.data_settings(),
        "answer_format": answer_format,
        "registry": dict(registry),
        "totals": totals,
        "per_source": sources,
    }
    storage.write_json(RLFolder(paths.rl).data_summary, summary)
    return summary
