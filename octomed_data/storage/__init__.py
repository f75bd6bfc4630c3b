"""The one storage layer: Parquet datasets of atomically committed shards behind fsspec URIs.

A *dataset* is a folder ``URI`` holding ``part-<shard>.parquet`` files and a manifest folder
``URI/_manifest/`` with one JSON marker per committed shard (file, row count, bytes). A shard
is committed in two steps: the Parquet file is written atomically (temp file + rename on
filesystems that rename atomically; a single PUT on object stores, which makes an object
visible only once complete), then its marker is written the same way. Readers go by the
manifest, so they never see a half-written shard, and re-writing a shard replaces it, so a
re-run never duplicates rows. Folders starting with ``_`` or ``.`` are ignored by
``pyarrow.dataset`` and by the ``*.parquet`` glob that ``datasets.load_dataset`` is given.

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
from octomed_data.storage.files import (
    absolute_uri,
    check_fence,
    configure,
    create_exclusive,
    describe_error,
    ensure_writable,
    exists,
    fenced,
    filesystem,
    glob_escape,
    is_local,
    join,
    list_files,
    list_prefixed,
    protocol_of,
    read_bytes,
    read_json,
    remove_quietly,
    storage_options,
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
    "absolute_uri",
    "check_fence",
    "configure",
    "create_exclusive",
    "describe_error",
    "ensure_writable",
    "exists",
    "fenced",
    "filesystem",
    "glob_escape",
    "is_local",
    "join",
    "list_files",
    "list_prefixed",
    "protocol_of",
    "read_bytes",
    "read_json",
    "remove_quietly",
    "storage_options",
    "table_to_parquet_bytes",
    "to_uri",
    "update_digest",
    "wrap",
    "write_bytes",
    "write_json",
]
