"""Release a run the way OctoMed published its data: one row per question with every accepted reply.

``release(paths, out)`` reads a filtered run shard by shard and writes a self-contained folder that
``datasets.load_dataset`` reads, locally or from ``s3://``::

    OUT/data/train-<shard>.parquet   one row per question (RELEASE_SCHEMA): options, answer, image
                                     hashes and content-addressed references, source provenance, and
                                     ``responses`` (teacher, model, prompt version, sampling params,
                                     reasoning, reply, verdict, tokens)
    OUT/data/_manifest/<shard>.json  the storage layer's commit markers (ignored by readers)
    OUT/release.json                 what was released, excluded and scrubbed (machine readable)
    OUT/README.md                    the dataset card (:mod:`octomed_data.release_card`), written last:
                                     its YAML header holds the ``configs`` and ``dataset_info``
                                     (features, split sizes) that ``datasets`` reads

A shard with no released row (every question a benchmark match, or none left after
decontamination) writes no file, and a release with no row at all is an error, not an empty
dataset.

``with_images=True`` ships the pixels: ``images`` is then a list of ``datasets.Image`` values whose
PNG bytes are embedded in the Parquet rows (the run's content-addressed, metadata-free PNGs, byte
for byte; decoded to PIL images by ``load_dataset``, locally and from ``s3://``), and the hash
references move to ``image_refs``. Without it, ``images`` holds the references only.

Responses are the accepted samples (``filter/accepted``); ``all_responses=True`` adds the rejected
ones from ``distill/raw`` (failed requests carry no reply and are left out). Every response carries
its verdict from ``filter/verdicts`` with the verifier's provenance: ``verifier`` (exact |
normalized | judge), ``verifier_rule`` and ``judge_correct`` (the LLM judge's verdict when asked),
and the card shows the verify settings and the judge's calibration per source, false-accept rate
included, so a judge-accepted answer is never presented as an exact match.

Before anything is published, every question is checked against the decontamination registry the
run names (a question matching a held-out benchmark item is excluded and listed, whatever the run's
decontamination did), ``metadata`` loses patient and DICOM identifying fields, no pixels are copied
(hashes and ``images/ab/<sha>.png`` references only) unless ``with_images``, an image shipped must be
the stored PNG of its hash with no metadata chunk (EXIF, text, time), and every row is scanned for
the teachers' API keys (found: the shard is not committed and the release stops with one line).

Memory: one questions shard (no reply text) plus one bucket of its replies at a time. A shard whose
replies are large is first spilled into buckets by question id (local Parquet files), so a bucket
holds about ``BUCKET_BYTES`` of decoded text whatever the shard size.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from octomed_data import storage
from octomed_data.errors import ConfigError, StorageError
from octomed_data.layout import ReleaseFolder, RunPaths
from octomed_data.release_run import (
    removed_by_benchmark,
    run_recipe,
    sampling_table,
    teacher_configs,
    verifier_summary,
)
from octomed_data.release_safety import SecretGuard, image_metadata_chunks, scrub_metadata
from octomed_data.schema import QUESTION_SCHEMA, RELEASE_SCHEMA, SAMPLE_SCHEMA, VERDICT_SCHEMA

RELEASE_VERSION = "2"  # 2: responses carry verifier, verifier_rule, judge_correct
SPLIT = "train"  # OctoMed published one training split; the card's config reads data/train-*
# ``datasets.Image``'s Arrow storage: the PNG bytes and a file name (the bytes decide).
IMAGE_DATA_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
ROWS_PER_GROUP = 256
ROWS_PER_GROUP_WITH_IMAGES = 32  # a few MB of PNG per row group (row groups are read whole)
FAILED = "request_failed"
BUCKET_BYTES = 64 * 2**20  # decoded reply text held at once while grouping a shard's replies
_DECODED_PER_FILE_BYTE = 4  # zstd Parquet of prose decodes to about 4x its file size

_RESPONSE_FIELDS = (
    "sample_idx", "teacher", "model", "prompt_version", "params_hash", "seed", "reasoning", "response",
    "extracted_answer", "extraction_method", "correct", "reject_reason", "finish_reason",
    "prompt_tokens", "completion_tokens",
)  # fmt: skip
_VERDICT_FIELDS = (
    "extracted_answer", "extraction_method", "correct", "reject_reason", "verifier", "verifier_rule",
    "judge_correct",
)  # fmt: skip


@dataclass
class ReleaseResult:
    """Where the release went and what it holds (``release.json`` is this, plus the registry)."""

    uri: str
    run_id: str
    all_responses: bool
    with_images: bool = False  # pixels embedded (``images``: datasets.Image) or references only
    rows: int = 0
    responses: int = 0
    images: int = 0  # images embedded in the rows (with_images)
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)
    excluded: list[dict[str, str]] = field(default_factory=list)  # registry matches left out
    metadata_keys_dropped: dict[str, int] = field(default_factory=dict)
    unknown_sampling_params: int = 0  # replies whose teacher params the run no longer records
    prompt_versions: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    shards_without_rows: list[str] = field(default_factory=list)  # no released row: no file written
    card: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------- schema
def release_schema(with_images: bool = False) -> pa.Schema:
    """The rows' schema: :data:`RELEASE_SCHEMA`, or with ``with_images`` ``images`` as
    ``datasets.Image`` values (embedded PNG bytes) and the references in ``image_refs``.
    Both carry the ``datasets`` features in the Parquet metadata, so ``load_dataset("parquet",
    data_files=...)`` decodes the images without the card."""
    fields: list[pa.Field] = []
    for f in RELEASE_SCHEMA:
        if f.name == "images" and with_images:
            # Nullable like the features' own field: datasets only trusts metadata features whose
            # Arrow field equals the file's.
            fields += [pa.field("images", pa.list_(IMAGE_DATA_TYPE)), pa.field("image_refs", f.type, False)]
        else:
            fields.append(f)
    schema = pa.schema(fields, metadata=RELEASE_SCHEMA.metadata)
    features = {"info": {"features": release_features(schema).to_dict()}}
    return schema.with_metadata(dict(RELEASE_SCHEMA.metadata) | {b"huggingface": json.dumps(features)})


def release_features(schema: pa.Schema):
    """The ``datasets.Features`` of a release schema (``images`` of embedded bytes: ``Image``)."""
    import datasets

    plain = schema.remove_metadata()
    features = datasets.Features.from_arrow_schema(plain)
    if plain.field("images").type == pa.list_(IMAGE_DATA_TYPE):
        features["images"] = datasets.List(datasets.Image())
    return features


# ---------------------------------------------------------------------------------------- shards
def _bucket_of(question_id: str, n: int) -> int:
    return int(question_id[:8], 16) % n if n > 1 else 0  # ids are hex content hashes


class _ReplyBuckets:
    """One shard's replies grouped by question, spilled to local Parquet buckets when large."""

    def __init__(self, ds: storage.Dataset, shard: str, tmp: str) -> None:
        info = ds.shard_info(shard)
        decoded = (info.bytes if info else 0) * _DECODED_PER_FILE_BYTE
        self.n = max(1, -(-decoded // BUCKET_BYTES))
        cols = [c for c in _RESPONSE_FIELDS if c in SAMPLE_SCHEMA.names] + ["question_id"]
        self.tables: list[str | pa.Table] = []
        if self.n == 1:
            self.tables = [ds.read_shard(shard, cols)]
            return
        paths = [os.path.join(tmp, f"bucket-{b}.parquet") for b in range(self.n)]
        schema = pa.schema([SAMPLE_SCHEMA.field(c) for c in cols])
        writers = [pq.ParquetWriter(p, schema) for p in paths]
        try:
            for batch in ds.iter_batches(batch_size=1024, columns=cols, shards=[shard]):
                ids = batch.column(cols.index("question_id")).to_pylist()
                which = pa.array([_bucket_of(q, self.n) for q in ids])
                for b in set(which.to_pylist()):
                    part = batch.filter(pa.compute.equal(which, b))
                    writers[b].write_table(pa.Table.from_batches([part], schema))
        finally:
            for w in writers:
                w.close()
        self.tables = list(paths)

    def load(self, b: int) -> dict[str, list[dict[str, Any]]]:
        src = self.tables[b]
        table = pq.read_table(src) if isinstance(src, str) else src
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in table.to_pylist():
            out[row["question_id"]].append(row)
        return out


def _verdicts(paths: RunPaths, shard: str) -> tuple[dict[str, list[int]], dict[tuple[str, int], dict]]:
    """Per question [judged samples, accepted]; per (question, sample) its verdict fields."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    verdicts: dict[tuple[str, int], dict[str, Any]] = {}
    cols = ["question_id", "sample_idx", *_VERDICT_FIELDS]
    ds = storage.Dataset(paths.verdicts, VERDICT_SCHEMA)
    for batch in ds.iter_batches(columns=cols, shards=[shard]):
        for row in batch.to_pylist():
            if row["reject_reason"] == FAILED:
                continue
            c = counts[row["question_id"]]
            c[0] += 1
            c[1] += bool(row["correct"])
            verdicts[(row["question_id"], row["sample_idx"])] = {k: row[k] for k in _VERDICT_FIELDS}
    return counts, verdicts


@dataclass
class _Context:
    """What every shard of one release shares."""

    paths: RunPaths
    replies: storage.Dataset
    target: storage.Dataset
    index: Any  # octomed_data.decontam.DecontamIndex
    sampling: dict[tuple[str, str], dict[str, Any]]
    guard: SecretGuard
    all_responses: bool
    result: ReleaseResult
    with_images: bool = False
    dropped: Counter[str] = field(default_factory=Counter)
    prompt_versions: set[str] = field(default_factory=set)


def _response(row: Mapping[str, Any], verdict: Mapping[str, Any] | None, ctx: _Context) -> dict[str, Any]:
    out = {k: row.get(k) for k in _RESPONSE_FIELDS}
    if verdict is not None:  # raw replies carry no verdict: the filter stage's is joined in
        out.update(verdict)
    params = ctx.sampling.get((row["teacher"], row["params_hash"]))
    if params is None:
        ctx.result.unknown_sampling_params += 1
    out.update(params or {})
    ctx.prompt_versions.add(row["prompt_version"])
    return out


def _image_ref(image: Mapping[str, Any]) -> dict[str, Any]:
    sha = image["sha256"]
    return {k: image.get(k) for k in ("sha256", "phash", "width", "height")} | {
        "path": f"images/{sha[:2]}/{sha}.png"
    }


def _image_data(image: Mapping[str, Any], ctx: _Context, where: str) -> dict[str, Any]:
    """The stored PNG of one image, checked: its SHA-256 is its content address (the very bytes
    the run stored and fingerprinted), it holds no metadata chunk and no teacher's API key."""
    sha, uri = image["sha256"], image.get("uri")
    if not uri:
        raise StorageError(f"{where}: image {sha} has no stored copy (ingested without an image store)")
    data = storage.read_bytes(uri)
    if hashlib.sha256(data).hexdigest() != sha:
        raise StorageError(f"{where}: the stored image at {uri} is not the image {sha} (content changed)")
    found = image_metadata_chunks(data)
    if found:
        raise ConfigError(f"{where}: image {sha} carries metadata ({', '.join(found)}); not published")
    ctx.guard.check_bytes(data, f"{where}: image {sha}")
    ctx.result.images += 1
    return {"bytes": data, "path": f"{sha}.png"}


def release_shard(ctx: _Context, shard: str) -> int:
    """Write one questions shard as ``data/train-<shard>.parquet``; returns its rows."""
    counts, verdicts = _verdicts(ctx.paths, shard)
    questions = storage.Dataset(ctx.paths.questions, QUESTION_SCHEMA).read_shard(shard)
    matches = ctx.index.check_table(questions) if questions.num_rows else []
    ids = questions.column("question_id").to_pylist()
    per_source = ctx.result.per_source
    with tempfile.TemporaryDirectory(prefix="octomed-release-") as tmp:
        buckets = _ReplyBuckets(ctx.replies, shard, tmp)
        order: dict[int, list[int]] = defaultdict(list)
        for i, qid in enumerate(ids):
            order[_bucket_of(qid, buckets.n)].append(i)
        per_group = ROWS_PER_GROUP_WITH_IMAGES if ctx.with_images else ROWS_PER_GROUP
        writer = ctx.target.writer(shard, rows_per_group=per_group)
        try:
            for b in sorted(order):
                replies = buckets.load(b)
                for i in order[b]:
                    q = questions.slice(i, 1).to_pylist()[0]
                    src = per_source.setdefault(q["source"], Counter())
                    if matches[i] is not None:
                        m = matches[i]
                        ctx.result.excluded.append(
                            {"question_id": q["question_id"], "source": q["source"], "kind": m.kind}
                            | {"benchmark": m.benchmark, "item_id": m.item_id}
                        )
                        src["excluded"] += 1
                        continue
                    row = _row(q, replies.get(q["question_id"], []), counts, verdicts, ctx)
                    text = {k: v for k, v in row.items() if k != "images"} if ctx.with_images else row
                    ctx.guard.check(json.dumps(text, default=str), f"question {q['question_id']}")
                    writer.add(row)
                    src["rows"] += 1
                    src["responses"] += len(row["responses"])
                    src["accepted_responses"] += sum(bool(r["correct"]) for r in row["responses"])
                    for r in row["responses"]:
                        if r["correct"]:
                            src[f"accepted_by_{r.get('verifier') or 'unknown'}"] += 1
                    src["without_accepted"] += row["num_accepted"] == 0
            writer.flush()
        except BaseException:
            writer.abort()
            raise
        if not writer.rows:  # nothing released from this shard: no file (and none left from before)
            writer.abort()
            ctx.target.delete_shard(shard)
            ctx.result.shards_without_rows.append(shard)
            return 0
        extra = {"counts": {"rows": writer.rows}, "release_version": RELEASE_VERSION}
        info = writer.commit(extra | {"with_images": ctx.with_images})
    return info.rows


def _row(
    q: dict[str, Any],
    replies: list[dict[str, Any]],
    counts: Mapping[str, list[int]],
    verdicts: Mapping[tuple[str, int], dict[str, Any]],
    ctx: _Context,
) -> dict[str, Any]:
    responses = []
    for r in sorted(replies, key=lambda r: r["sample_idx"]):
        if r.get("reject_reason") == FAILED:  # no reply to publish
            continue
        # The filter's verdict (current: release checks it), with the verifier's provenance.
        responses.append(_response(r, verdicts.get((r["question_id"], r["sample_idx"])), ctx))
    judged, accepted = counts.get(q["question_id"], (0, 0))
    images = q["images"] or []
    row = {
        **{k: q[k] for k in ("question_id", "source", "task_type", "modality", "anatomy", "question")},
        **{k: q[k] for k in ("options", "answer", "answer_text", "record_index")},
        "source_split": q["split"],
        "images": [_image_ref(im) for im in images],
        "metadata": scrub_metadata(q.get("metadata"), ctx.dropped),
        "source_file": os.path.basename(str(q["input_file"]).rstrip("/")),
        "num_samples": judged,
        "num_accepted": accepted,
        "responses": responses,
    }
    if ctx.with_images:  # the pixels in ``images``, their references beside them
        row["image_refs"] = row["images"]
        row["images"] = [_image_data(im, ctx, f"question {q['question_id']}") for im in images]
    return row


# --------------------------------------------------------------------------------------- release
def release(
    paths: RunPaths,
    out: str,
    *,
    all_responses: bool = False,
    with_images: bool | None = None,
    licenses: Mapping[str, str] | None = None,
    progress: bool = False,
) -> ReleaseResult:
    """Release a filtered run into ``out`` (any storage URI); see the module docstring.

    ``with_images``: embed the images' pixels; None: the recipe's ``release.with_images``."""
    from octomed_data.decontam.index import DecontamIndex
    from octomed_data.release_card import registry_info, render_card
    from octomed_data.stages.filter import FilterStage

    t0 = time.time()
    recipe = run_recipe(paths)
    if with_images is None:
        with_images = recipe.release.with_images
    shards = storage.Dataset(paths.questions, QUESTION_SCHEMA).committed_names()
    if not shards:
        raise StorageError(f"run {paths.run_id} has no questions at {paths.questions}: nothing to release")
    # Done as the filter flow committed it: the run's own verifier settings and judge (the judge's
    # model and sampling, not its URL, are in the fingerprint; a stand-in URL will do).
    filtered = FilterStage.for_recipe(paths, recipe)
    pending = [s for s in shards if not filtered.is_done(s)]
    if pending or not storage.exists(paths.stats):
        named = ", ".join(pending[:5]) + (" ..." if len(pending) > 5 else "")
        raise ConfigError(
            f"run {paths.run_id} is not filtered"
            + (f" (shards without current verdicts: {named})" if pending else " (no filter/stats.json)")
            + ": run the filter stage first"
        )
    stats = storage.read_json(paths.stats)
    table, registry = registry_info(recipe.decontam.registry)
    index = DecontamIndex.from_registry(
        table, short_match=recipe.decontam.short_match, phash_threshold=recipe.decontam.phash_threshold
    )
    teachers = teacher_configs(paths, recipe)
    folder = ReleaseFolder(out)
    storage.ensure_writable(out)
    result = ReleaseResult(uri=out, run_id=paths.run_id, all_responses=all_responses, with_images=with_images)
    ctx = _Context(
        paths=paths,
        replies=storage.Dataset(paths.raw if all_responses else paths.accepted, SAMPLE_SCHEMA),
        target=storage.Dataset(folder.data, release_schema(with_images), file_prefix=SPLIT),
        index=index,
        sampling=sampling_table(teachers),
        guard=SecretGuard.from_env(t.api_key_env for t in teachers),
        all_responses=all_responses,
        result=result,
        with_images=with_images,
    )
    bar = None
    if progress:
        from octomed_data.stages.local import shard_progress_bar

        bar = shard_progress_bar(len(shards), "release")
    try:
        for shard in shards:
            result.rows += release_shard(ctx, shard)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    written = [s for s in shards if s not in result.shards_without_rows]
    ctx.target.drop_stale(keep=written)  # a re-release of a run that lost shards keeps none of them
    if not result.rows:  # not an empty dataset; an earlier release's card there goes with its rows
        for uri in (folder.card, folder.summary):
            if storage.exists(uri):
                fs, path = storage.filesystem(uri)
                fs.rm(path)
        raise ConfigError(
            f"run {paths.run_id} has no question to release ({len(result.excluded)} excluded as "
            f"benchmark matches, {len(shards)} shard(s) read): no dataset written at {out}"
        )
    result.responses = sum(s["responses"] for s in result.per_source.values())
    result.per_source = {k: dict(sorted(v.items())) for k, v in sorted(result.per_source.items())}
    result.metadata_keys_dropped = dict(sorted(ctx.dropped.items()))
    result.prompt_versions = sorted(ctx.prompt_versions)
    result.files = ctx.target.files()
    result.card = folder.card
    result.seconds = round(time.time() - t0, 3)
    summary = result.to_dict() | {
        "release_version": RELEASE_VERSION,
        "registry": registry,
        "decontam_removed": removed_by_benchmark(paths),
        "verifier": verifier_summary(stats),
    }
    card = render_card(
        recipe, stats, summary, teachers, licenses=licenses, dataset_info=dataset_info(ctx.target)
    )
    ctx.guard.check(card, "the dataset card")
    ctx.guard.check(json.dumps(summary, default=str), "release.json")
    storage.write_json(folder.summary, summary)
    storage.write_bytes(folder.card, card.encode("utf-8"))  # last: a release with a card is complete
    return result


def dataset_info(target: storage.Dataset) -> dict[str, Any]:
    """The card's ``dataset_info``, as ``datasets`` reads it: the features and the one split with
    its rows and bytes (uncompressed size of the Parquet data; ``download_size``: the files)."""
    shards = target.committed(lambda info: (info.file, info.rows, info.bytes)).values()  # not whole markers
    num_bytes = 0
    for file, _rows, _size in shards:
        fs, path = storage.filesystem(storage.join(target.uri, file))
        with fs.open(path, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
            num_bytes += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return {
        "features": release_features(target.schema or RELEASE_SCHEMA)._to_yaml_list(),
        "splits": [
            {"name": SPLIT, "num_bytes": num_bytes, "num_examples": sum(rows for _, rows, _ in shards)}
        ],
        "download_size": sum(size for _, _, size in shards),
        "dataset_size": num_bytes,
    }


def load_release(uri: str, **kwargs: Any):
    """``datasets.load_dataset`` over a release folder's rows (local or object store)."""
    import datasets

    files = storage.Dataset(ReleaseFolder(uri).data, file_prefix=SPLIT).files()
    if not files:
        raise StorageError(f"no released shards at {uri}")
    return datasets.load_dataset(
        "parquet",
        data_files={SPLIT: files},
        split=SPLIT,
        storage_options=storage.storage_options(uri),
        **kwargs,
    )
