"""Checkpoint I/O shared by SFT and evaluation: the ``checkpoint.json`` marker (written last, so a
checkpoint without it is an incomplete upload), listing, uploading and downloading checkpoint
folders (streamed, local or ``s3://``), and listing the intermediate checkpoints.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.layout import CheckpointFolder

log = logging.getLogger(__name__)

CHECKPOINT_MARKER = "checkpoint.json"


def write_checkpoint_marker(checkpoint_uri: str, marker: dict[str, Any]) -> None:
    """Write ``checkpoint.json`` into ``checkpoint_uri``: last, after every file is uploaded."""
    storage.write_json(CheckpointFolder(checkpoint_uri).marker, marker)


def read_checkpoint_marker(checkpoint_uri: str) -> dict[str, Any]:
    """The ``checkpoint.json`` of a finished checkpoint; a missing one means an incomplete upload."""
    marker = CheckpointFolder(checkpoint_uri).marker
    if not storage.exists(marker):
        raise ConfigError(f"no {CHECKPOINT_MARKER} at {checkpoint_uri}: not a finished checkpoint")
    return storage.read_json(marker)


def list_files(uri: str) -> list[str]:
    """Every file under ``uri``, as sorted paths relative to it."""
    fs, base = storage.filesystem(uri)
    base = base.rstrip("/")
    try:
        found = fs.find(base)
    except Exception as exc:
        raise ConfigError(storage.describe_error(uri, exc)) from None
    return sorted(
        p[len(base) + 1 :] for p in found if p.startswith(base + "/") and CHECKPOINT_MARKER not in p
    )


def download_folder(src_uri: str, files: list[str], local: Path) -> Path:
    """Copy ``files`` (relative paths) from ``src_uri`` into ``local`` (streamed)."""
    fs, base = storage.filesystem(src_uri)
    for rel in files:
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fs.get_file(
                f"{base.rstrip('/')}/{rel}" if "://" in src_uri else os.path.join(base, rel), str(target)
            )
        except Exception as exc:
            raise ConfigError(storage.describe_error(src_uri, exc)) from None
    return local


def upload_folder(local: Path, dest_uri: str) -> list[str]:
    """Copy every file under ``local`` to ``dest_uri`` (streamed: model shards can be many GB)."""
    fs, base = storage.filesystem(dest_uri)
    uploaded = []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = path.relative_to(local).as_posix()
        target = f"{base.rstrip('/')}/{rel}" if "://" in dest_uri else os.path.join(base, rel)
        try:
            if "://" not in dest_uri:
                os.makedirs(os.path.dirname(target), exist_ok=True)
            fs.put_file(str(path), target)
        except Exception as exc:
            raise ConfigError(storage.describe_error(dest_uri, exc)) from None
        uploaded.append(rel)
    return uploaded


def intermediate_checkpoints(
    output_uri: str, config_hash: str | None = None
) -> list[tuple[int, str, dict[str, Any]]]:
    """Every uploaded intermediate checkpoint under ``output_uri`` (step, URI, marker), by step;
    with ``config_hash`` only those of that config (a learning curve is one run's checkpoints)."""
    base = CheckpointFolder(output_uri).intermediate
    fs, path = storage.filesystem(base)
    try:
        if not fs.exists(path):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except Exception as exc:
        raise ConfigError(storage.describe_error(base, exc)) from None
    found = []
    for name in names:
        step = CheckpointFolder(output_uri).step(name)
        marker_uri = CheckpointFolder(step).marker
        if name.startswith("checkpoint-") and storage.exists(marker_uri):
            marker = storage.read_json(marker_uri)
            if config_hash is None or marker.get("config_hash") == config_hash:
                found.append((int(marker["step"]), step, marker))
    return sorted(found, key=lambda f: f[0])
