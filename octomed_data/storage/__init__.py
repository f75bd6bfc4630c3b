"""The one storage layer: Parquet datasets of atomically committed shards behind fsspec URIs.

A *dataset* is a folder ``URI`` holding ``part-<shard>.parquet`` files and a manifest folder
``URI/_manifest/`` with one JSON marker per committed shard (file, row count, bytes). A shard
is committed in two steps: its marker is written, then the Parquet file is put in place
atomically (a hidden temp file renamed on filesystems that rename atomically; a single PUT on
object stores, which makes an object visible only once complete). A shard is committed when its
marker and the file it names both exist, so the files standard readers see (``pyarrow.dataset``,
the ``*.parquet`` glob that ``datasets.load_dataset`` is given) are exactly the committed shards
at every moment, whatever is killed when; re-writing a shard takes its old file away first, so a
re-run never duplicates rows. Temp files and folders starting with ``_`` or ``.`` are ignored by
those readers. What killed writers leave is cleared: their temp files (named
``.<file>~<pid>~<host>~<random>.tmp``, removed once that process is gone, or after an hour for
another host's) by the next write of the same file, the next writer of the shard (in a folder of
more than 1,000 entries, a write's look comes once in a while: :mod:`.scans`) and
:meth:`Dataset.drop_stale`; a shard file without its marker (left by versions that wrote the
file first) by the same two; a marker without its file is replaced by the shard's next commit.

URIs: a plain path or ``file://`` (default), ``s3://bucket/prefix`` through s3fs against any
S3-compatible endpoint, or ``memory://`` (tests). S3 endpoint and credentials come from the
environment (``OCTOMED_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL``; ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` read by botocore itself) or from :func:`configure`, never from code.

Modules: :mod:`.files` (URIs, reads, atomic/exclusive writes, listings, write fences) and
:mod:`.dataset` (:class:`Dataset`, :class:`ShardWriter`, :class:`ShardInfo`); every public name
is importable from here.
"""

from __future__ import annotations

from octomed_data.storage.dataset import (
    MANIFEST_DIR,
    SHARD_NAME,
    Dataset,
    ShardInfo,
    ShardWriter,
    table_to_parquet_bytes,
)
from octomed_data.storage.fences import check_fence, fenced, in_fence
from octomed_data.storage.files import (
    UnreadableFile,
    absolute_uri,
    clean_temp_files,
    configure,
    create_exclusive,
    describe_error,
    ensure_writable,
    exists,
    filesystem,
    glob_escape,
    is_local,
    join,
    list_files,
    list_prefixed,
    one_get,
    overwrite_in_place,
    protocol_of,
    read_bytes,
    read_json,
    remove_quietly,
    storage_options,
    temp_name,
    to_uri,
    update_digest,
    wrap,
    write_bytes,
    write_json,
)

__all__ = [
    "Dataset",
    "MANIFEST_DIR",
    "SHARD_NAME",
    "ShardInfo",
    "ShardWriter",
    "UnreadableFile",
    "absolute_uri",
    "check_fence",
    "clean_temp_files",
    "configure",
    "create_exclusive",
    "describe_error",
    "ensure_writable",
    "exists",
    "fenced",
    "filesystem",
    "glob_escape",
    "in_fence",
    "is_local",
    "join",
    "list_files",
    "list_prefixed",
    "overwrite_in_place",
    "protocol_of",
    "one_get",
    "read_bytes",
    "read_json",
    "remove_quietly",
    "storage_options",
    "table_to_parquet_bytes",
    "temp_name",
    "to_uri",
    "update_digest",
    "wrap",
    "write_bytes",
    "write_json",
]
