"""Image normalisation and fingerprints.

Every image that enters the factory is normalised the same way: decoded, converted to
8-bit ``L`` or ``RGB``, resized to at most ``MAX_PIXELS`` (262,144, as in OctoMed) keeping
the aspect ratio, and re-encoded as PNG with no metadata. The SHA-256 of those normalised
bytes is the image's content address; a 64-bit DCT perceptual hash finds near-duplicates
(re-encoded, rescaled, slightly brightened copies) that an exact hash misses.
"""

from __future__ import annotations

import hashlib
import io
import math

import numpy as np
from PIL import Image

MAX_PIXELS = 262_144


def fit_within(width: int, height: int, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Largest size with the same aspect ratio and at most ``max_pixels`` pixels."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    # Rounding can leave us a pixel row over the budget; step down until inside.
    while w * h > max_pixels:
        if w >= h:
            w -= 1
        else:
            h -= 1
    return w, h


def normalize_image(img: Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """8-bit L/RGB, at most ``max_pixels``, aspect ratio kept, no metadata carried over."""
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img).convert("RGB")
    elif img.mode not in ("L", "RGB"):
        img = img.convert("RGB") if img.mode in ("CMYK", "YCbCr", "LAB", "HSV") else img.convert("L")
    w, h = fit_within(*img.size, max_pixels=max_pixels)
    if (w, h) != img.size:
        img = img.resize((w, h), Image.Resampling.LANCZOS)
    # A fresh image drops EXIF / text chunks / ICC: nothing from the source header survives.
    clean = Image.new(img.mode, img.size)
    clean.paste(img)
    return clean


def encode_png(img: Image.Image) -> bytes:
    """Deterministic PNG bytes (same pixels -> same bytes -> same SHA-256)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0, :] = math.sqrt(1.0 / n)
    return m


_DCT32 = _dct_matrix(32)


def phash(img: Image.Image) -> int:
    """64-bit perceptual hash (DCT of a 32x32 greyscale thumbnail, top-left 8x8 vs median)."""
    grey = img.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    dct = _DCT32 @ pixels @ _DCT32.T
    low = dct[:8, :8].flatten()
    bits = low > np.median(low[1:])
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value


def hamming(a: int, b: int) -> int:
    return (int(a) ^ int(b)).bit_count()


def open_raster(source: str | bytes) -> Image.Image:
    """Decode a JPEG/PNG (or any PIL raster) from a path or bytes, EXIF orientation applied."""
    from PIL import ImageOps

    img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    img.load()
    return ImageOps.exif_transpose(img)


def fingerprint(img: Image.Image, max_pixels: int = MAX_PIXELS) -> tuple[bytes, str, int]:
    """Normalise ``img`` and return (normalised PNG bytes, SHA-256 hex, 64-bit pHash).

    Ingest and the benchmark registry both go through this, so equal images get equal hashes.
    """
    norm = normalize_image(img, max_pixels=max_pixels)
    data = encode_png(norm)
    return data, sha256_hex(data), phash(norm)
