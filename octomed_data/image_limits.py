"""Per-record resource limits of the image decoders (:mod:`octomed_data.images`).

What one image record may declare, checked before anything is allocated: the file's bytes, a
raster's pixels, a DICOM object's rows x columns (x frames x samples), a NIfTI volume's voxels and
its slice. Past a limit the record is quarantined as ``image_too_large``: a decompression bomb or a
header declaring 100000^3 voxels is one bad record, never a ``MemoryError`` that stops the source.
"""

from __future__ import annotations

from typing import Any

from octomed_data.schema import RecordError

TOO_LARGE = "image_too_large"
MAX_IMAGE_BYTES = 1 << 30  # an image file (read whole by the DICOM reader, or from remote storage)
MAX_SOURCE_PIXELS = 89_478_485  # one decoded 2-D plane: PIL's own decompression-bomb threshold
MAX_VOLUME_VOXELS = 1 << 30  # a NIfTI volume / all frames of a DICOM object (samples included)


def check_declared(count: int, limit: int, what: str) -> None:
    """Refuse a record whose header declares more than ``limit`` (pixels, voxels, bytes)."""
    if count > limit:
        raise RecordError(TOO_LARGE, f"{what}: declares {count:,}, more than the limit of {limit:,}")


def _first(value: Any) -> Any:
    if isinstance(value, str | bytes):
        return value
    try:
        return value[0]
    except (TypeError, IndexError, KeyError):
        return value


def check_dicom_size(ds: Any, what: str) -> None:
    """A DICOM dataset's declared rows x columns (one frame), and x frames x samples per pixel
    (what ``pixel_array`` allocates), before its pixels are decoded."""
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames = max(int(_first(ds.get("NumberOfFrames", 1)) or 1), 1)
        samples = max(int(ds.get("SamplesPerPixel") or 1), 1)
    except (TypeError, ValueError):
        raise RecordError("corrupt_image", f"{what}: unreadable image size fields") from None
    check_declared(rows * cols, MAX_SOURCE_PIXELS, f"{what} of {rows}x{cols} pixels")
    check_declared(rows * cols * frames * samples, MAX_VOLUME_VOXELS, f"{what} of {frames} frames")
