"""Image normalisation and fingerprints.

Every image that enters the factory is normalised the same way: decoded, converted to
8-bit ``L`` or ``RGB``, resized to at most ``MAX_PIXELS`` (262,144, as in OctoMed) keeping
the aspect ratio, and re-encoded as PNG with no metadata. The SHA-256 of those normalised
bytes is the image's content address; a 64-bit DCT perceptual hash finds near-duplicates
(re-encoded, rescaled, slightly brightened copies) that an exact hash misses.

:func:`load_image` decodes JPEG/PNG, DICOM (windowed; only ``Modality`` kept) and NIfTI (a
representative slice); :class:`ImageStore` stores each normalised image once, content-addressed
under ``<root>/images/<sha[:2]>/<sha>.png``. Per-image problems raise
:class:`~octomed_data.schema.RecordError` (``missing_image``, ``corrupt_image``,
``unreadable_image``, ``image_too_large``: past a size :mod:`~octomed_data.image_limits` checks
before anything is allocated) so the record is quarantined, never the source.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from octomed_data import image_limits as limits
from octomed_data import storage
from octomed_data.errors import StorageError
from octomed_data.layout import image_object, images_dir
from octomed_data.schema import RecordError

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
    elif img.mode == "I" or img.mode.startswith(("I;16", "F")):
        # 16-bit / 32-bit / float greyscale (common for radiographs): PIL's convert("L") clips at
        # 255, which turns a 12-bit X-ray white. Stretch min..max onto 0..255 instead.
        img = Image.fromarray(_to_uint8(np.asarray(img)), "L")
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


def open_raster(source: str | bytes) -> Image.Image:
    """Decode a JPEG/PNG (or any PIL raster) from a path or bytes, EXIF orientation applied."""
    from PIL import ImageOps

    img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)  # the header only
    width, height = img.size
    limits.check_declared(width * height, limits.MAX_SOURCE_PIXELS, f"{width}x{height} pixel image")
    img.load()
    return ImageOps.exif_transpose(img)


def fingerprint(img: Image.Image, max_pixels: int = MAX_PIXELS) -> tuple[bytes, str, int]:
    """Normalise ``img`` and return (normalised PNG bytes, SHA-256 hex, 64-bit pHash).

    Ingest and the benchmark registry both go through this, so equal images get equal hashes.
    """
    norm = normalize_image(img, max_pixels=max_pixels)
    data = encode_png(norm)
    return data, sha256_hex(data), phash(norm)


# --------------------------------------------------------------------------------------------
# Loading JPEG/PNG, DICOM and NIfTI files, and the content-addressed image store.
# --------------------------------------------------------------------------------------------

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image and the one header field we keep: the DICOM ``Modality`` (or None)."""

    image: Image.Image
    modality: str | None


def _to_uint8(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Linearly map ``[lo, hi]`` (default: the array's min/max) to 0..255, clipping outside."""
    arr = np.nan_to_num(np.asarray(arr, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo = float(arr.min()) if lo is None else lo
    hi = float(arr.max()) if hi is None else hi
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    out = (np.clip(arr, lo, hi) - lo) * (255.0 / (hi - lo))
    return np.rint(out).astype(np.uint8)


def _looks_like_dicom(path: str, head: bytes) -> bool:
    return head[128:132] == b"DICM" or path.lower().endswith(DICOM_SUFFIXES)


def _looks_like_nifti(path: str, head: bytes) -> bool:
    if path.lower().endswith(NIFTI_SUFFIXES):
        return True
    # NIfTI-1 magic at byte 344, NIfTI-2 at byte 4 (uncompressed files without the usual suffix).
    return head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] in (b"n+2\x00", b"ni2\x00")


def _first(value):
    """First item of a DICOM multi-value (or the value itself)."""
    if isinstance(value, str | bytes):
        return value
    try:
        return value[0]
    except (TypeError, IndexError, KeyError):
        return value


def _dicom_window(ds) -> tuple[float, float] | None:
    """The first stored VOI window (center, width) of a DICOM dataset, if it is usable."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        c, w = float(_first(center)), float(_first(width))
    except (TypeError, ValueError):
        return None
    return (c, w) if w > 0 and math.isfinite(c) and math.isfinite(w) else None


def load_dicom(path: str) -> LoadedImage:
    """Decode a DICOM file into an 8-bit image; only ``Modality`` survives from the header.

    Modality LUT (rescale) first, then the stored VOI window (or VOI LUT), falling back to the
    pixel min/max; MONOCHROME1 is inverted so that bright means dense everywhere; multi-frame
    objects give their middle frame. Objects without pixel data (RT structure sets and plans,
    structured reports, waveforms) and pixel data no installed decoder can read raise
    ``RecordError("unreadable_image")``.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        # force=True reads files without the 128-byte preamble / "DICM" magic.
        ds = pydicom.dcmread(path, force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError) as exc:
        raise RecordError("corrupt_image", f"not a readable DICOM file ({type(exc).__name__})") from None
    modality = str(ds.get("Modality") or "").strip() or None
    what = f"DICOM {modality or 'object'}"
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        if modality is None and "SOPClassUID" not in ds:
            # force=True "succeeds" on anything; a dataset with neither is not one we can parse.
            raise RecordError(
                "unreadable_image", "DICOM dataset could not be parsed (no pixel data, no SOP class)"
            )
        raise RecordError("unreadable_image", f"{what} has no pixel data")
    limits.check_dicom_size(ds, what)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" not in meta:
        # Files without File Meta (no preamble) still say how they were parsed.
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if ds.is_implicit_VR else ExplicitVRLittleEndian
    try:
        arr = ds.pixel_array
    except Exception as exc:  # decoder plugins raise many types: any failure is one unreadable record
        msg = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise RecordError(
            "unreadable_image", f"{what}: pixel data not decodable: {type(exc).__name__}: {msg}"
        ) from None
    frames = int(_first(ds.get("NumberOfFrames", 1)) or 1)
    if frames > 1 and arr.ndim >= 3 and arr.shape[0] == frames:
        arr = arr[frames // 2]  # a representative frame of a cine / multi-slice object
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
        if arr.ndim == 3 and arr.shape[-1] in (3, 4):
            rgb = arr[..., :3]
            rgb = rgb if rgb.dtype == np.uint8 else _to_uint8(rgb)
            return LoadedImage(Image.fromarray(np.ascontiguousarray(rgb), "RGB"), modality)
        if arr.ndim != 2:
            raise RecordError("unreadable_image", f"{what}: unexpected pixel array shape {arr.shape}")
        values = apply_modality_lut(arr, ds)
        window = _dicom_window(ds)
        if window is not None:
            center, width = window
            grey = _to_uint8(values, center - width / 2.0, center + width / 2.0)
        elif "VOILUTSequence" in ds:
            grey = _to_uint8(apply_voi_lut(values, ds, index=0))
        else:
            grey = _to_uint8(values)
    except RecordError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise RecordError(
            "unreadable_image", f"{what}: cannot convert pixels: {type(exc).__name__}"
        ) from None
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return LoadedImage(Image.fromarray(np.ascontiguousarray(grey), "L"), modality)


def load_nifti(path: str) -> LoadedImage:
    """A representative 8-bit slice of a NIfTI-1/-2 volume (either byte order, .nii or .nii.gz).

    The middle axial slice of the first volume, found from the affine (the array axis closest
    to superior-inferior), oriented with anterior up, windowed at the 1st-99th percentile.
    Only that slice is read from disk.
    """
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        img = nib.load(path)
        shape = img.shape
    except (ImageFileError, OSError, EOFError, ValueError, TypeError) as exc:
        raise RecordError("corrupt_image", f"not a readable NIfTI file ({type(exc).__name__})") from None
    if len(shape) < 2 or min(shape[:2]) < 1:
        raise RecordError("unreadable_image", f"NIfTI has no 2-D image data (shape {tuple(shape)})")
    dims = [int(d) for d in shape[:3]]
    limits.check_declared(math.prod(dims), limits.MAX_VOLUME_VOXELS, f"NIfTI volume {dims}")
    largest = sorted(dims)[-2:]  # the slice read is at most the two largest axes
    limits.check_declared(largest[0] * largest[1], limits.MAX_SOURCE_PIXELS, "NIfTI slice")
    try:
        if len(shape) == 2:
            plane = np.asanyarray(img.dataobj[:, :])
        else:
            ornt = nib.orientations.io_orientation(img.affine)
            axis_of = {int(ornt[i, 0]): i for i in range(3) if not np.isnan(ornt[i, 0])}
            si_axis = axis_of.get(2, 2)
            index: list = [slice(None)] * 3 + [0] * (len(shape) - 3)  # first volume of 4-D+
            index[si_axis] = shape[si_axis] // 2
            plane = np.asanyarray(img.dataobj[tuple(index)])
            in_plane = [a for a in range(3) if a != si_axis]
            # Put the left-right axis first and anterior-posterior second, pointing R and A.
            ras = [int(ornt[a, 0]) if not np.isnan(ornt[a, 0]) else k for k, a in enumerate(in_plane)]
            if ras[0] > ras[1]:
                plane = plane.T
                in_plane = in_plane[::-1]
                ras = ras[::-1]
            for k, a in enumerate(in_plane):
                if not np.isnan(ornt[a, 1]) and ornt[a, 1] < 0:
                    plane = np.flip(plane, axis=k)
    except (OSError, EOFError, ValueError, TypeError, IndexError) as exc:
        raise RecordError("corrupt_image", f"NIfTI data not readable ({type(exc).__name__})") from None
    plane = np.asarray(plane, dtype=np.float64)
    if plane.ndim != 2:
        raise RecordError("unreadable_image", f"NIfTI slice has shape {plane.shape}")
    finite = plane[np.isfinite(plane)]
    if finite.size == 0:
        raise RecordError("unreadable_image", "NIfTI slice has no finite values")
    lo, hi = np.percentile(finite, [1.0, 99.0])
    grey = _to_uint8(plane, float(lo), float(hi))
    # Rows top-to-bottom = anterior-to-posterior, columns = right-to-left axis as stored.
    return LoadedImage(Image.fromarray(np.ascontiguousarray(np.flipud(grey.T)), "L"), None)


def load_image(path: str | os.PathLike[str]) -> LoadedImage:
    """Decode an image file: JPEG/PNG (any PIL raster), DICOM or NIfTI, by content and suffix.

    Raises :class:`~octomed_data.schema.RecordError` with reason ``missing_image`` (no such
    file), ``corrupt_image`` (not decodable as its format) or ``unreadable_image`` (a DICOM
    object without decodable pixels). Nothing from any file header except the DICOM
    ``Modality`` is returned.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(352)
    except FileNotFoundError:
        raise RecordError("missing_image", f"no such file: {path}") from None
    except IsADirectoryError:
        raise RecordError("missing_image", f"is a directory, not an image: {path}") from None
    except OSError as exc:
        raise RecordError("missing_image", f"cannot read {path}: {exc.strerror or exc}") from None
    if not head:
        raise RecordError("corrupt_image", f"empty file: {os.path.basename(path)}")
    limits.check_declared(
        os.path.getsize(path), limits.MAX_IMAGE_BYTES, f"{os.path.basename(path)}: file bytes"
    )
    try:
        if _looks_like_nifti(path, head):
            return load_nifti(path)
        if _looks_like_dicom(path, head):
            return load_dicom(path)
        return LoadedImage(open_raster(path), None)
    except RecordError:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own check, at twice its threshold
        raise RecordError(limits.TOO_LARGE, f"{os.path.basename(path)}: {exc}") from None
    except MemoryError:  # whatever the checks let through: still one record, never the source
        raise RecordError(
            limits.TOO_LARGE, f"{os.path.basename(path)}: decoding needs more memory than this process has"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise RecordError(
            "corrupt_image", f"cannot decode {os.path.basename(path)}: {type(exc).__name__}"
        ) from None
    except Exception as exc:
        # Damaged files make the decoders raise their own types (zlib.error from a broken .nii.gz,
        # pydicom's BytesLengthException, struct.error ...): one bad file is one quarantined record.
        raise RecordError(
            "corrupt_image", f"cannot decode {os.path.basename(path)}: {type(exc).__name__}"
        ) from None


class ImageStore:
    """Content-addressed store of normalised PNGs under ``root_uri/images/<sha[:2]>/<sha>.png``.

    ``put(path)`` returns ``(image, modality)``: ``image`` is a dict matching
    ``schema.IMAGE_TYPE`` (sha256, uri, phash, width, height) and ``modality`` the DICOM
    Modality (or None). An image referenced by many questions is decoded once per process
    (bounded LRU keyed by resolved path; failures are remembered too) and written once (an
    object already in the store is not rewritten). With ``root_uri=None`` images are decoded
    and fingerprinted but not stored (``uri`` is None): for inspection and tests only.
    """

    def __init__(self, root_uri: str | None, cache_size: int = 4096, max_pixels: int = MAX_PIXELS) -> None:
        # Image URIs land in question rows: absolute (one rule, storage.absolute_uri), so a run
        # written with a relative --out reads the same from any working directory.
        root_uri = storage.absolute_uri(root_uri) if root_uri else None
        self.root_uri = root_uri
        self.images_uri = images_dir(root_uri) if root_uri else None
        self.cache_size = cache_size
        self.max_pixels = max_pixels
        self._cache: OrderedDict[str, tuple[dict[str, Any], str | None] | RecordError] = OrderedDict()
        self._known: OrderedDict[str, None] = OrderedDict()  # shas known to be in the store
        self.decoded = 0  # files decoded (cache misses)
        self.written = 0  # objects written to the store
        self.reused = 0  # puts answered from the cache or by an object already stored

    def __repr__(self) -> str:
        return f"ImageStore({self.root_uri!r})"

    def uri_for(self, sha: str) -> str | None:
        return image_object(self.images_uri, sha) if self.images_uri else None

    def put(self, path: str | os.PathLike[str]) -> tuple[dict[str, Any], str | None]:
        """Decode, normalise and store the image at ``path`` (a local path or any fsspec URI).

        Raises ``RecordError`` if unusable.
        """
        location = os.fspath(path)
        if storage.protocol_of(location) != "file":
            return self._put(location, lambda: _load_remote(location))
        key = os.path.realpath(location.removeprefix("file://"))
        return self._put(key, lambda: load_image(key))

    def put_bytes(self, data: bytes, name: str = "") -> tuple[dict[str, Any], str | None]:
        """Decode, normalise and store an image given as bytes (``name``: its file name, if any,
        which tells DICOM/NIfTI apart by suffix). Raises ``RecordError`` if unusable."""
        key = "bytes:" + hashlib.sha256(data).hexdigest()
        return self._put(key, lambda: _load_bytes(data, name))

    def _put(self, key: str, load) -> tuple[dict[str, Any], str | None]:
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            self.reused += 1
            if isinstance(hit, RecordError):
                raise RecordError(hit.reason, hit.detail)
            return dict(hit[0]), hit[1]
        try:
            loaded = load()
            data, sha, ph = fingerprint(loaded.image, max_pixels=self.max_pixels)
        except RecordError as exc:
            self._remember(key, exc)
            raise
        self.decoded += 1
        width, height = _png_size(data)
        uri = self.uri_for(sha)
        if uri is not None and sha not in self._known:
            if storage.exists(uri):
                self.reused += 1
            else:
                storage.write_bytes(uri, data)
                self.written += 1
            self._known[sha] = None
            if len(self._known) > self.cache_size * 16:
                self._known.popitem(last=False)
        image = {"sha256": sha, "uri": uri, "phash": ph, "width": width, "height": height}
        self._remember(key, (image, loaded.modality))
        return dict(image), loaded.modality

    def _remember(self, key: str, value) -> None:
        self._cache[key] = value
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


def _load_bytes(data: bytes, name: str) -> LoadedImage:
    """Decode image bytes: through a private temporary file, since the DICOM and NIfTI readers
    (and the suffix rules of :func:`load_image`) work on files."""
    if not data:
        raise RecordError("corrupt_image", f"empty image {os.path.basename(name) or '(bytes)'}")
    base = os.path.basename(name)
    suffix = ".nii.gz" if base.lower().endswith(".nii.gz") else os.path.splitext(base)[1][:16]
    fd, tmp = tempfile.mkstemp(prefix=".octomed-image-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        try:
            return load_image(tmp)
        except RecordError as exc:  # say which image, not which temporary file
            raise RecordError(
                exc.reason, exc.detail.replace(os.path.basename(tmp), base or "(bytes)")
            ) from None
    finally:
        os.remove(tmp)


def _load_remote(uri: str) -> LoadedImage:
    """Decode an image stored at a remote URI (read once, decoded from bytes)."""
    try:
        fs, where = storage.filesystem(uri)
        size = fs.size(where)
    except Exception:  # noqa: BLE001  (no size: read_bytes says what is wrong)
        size = None
    if size is not None:
        limits.check_declared(int(size), limits.MAX_IMAGE_BYTES, f"{uri.rsplit('/', 1)[-1]}: file bytes")
    try:
        data = storage.read_bytes(uri)
    except StorageError as exc:
        raise RecordError("missing_image", str(exc)) from None
    return _load_bytes(data, uri)


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (no second decode)."""
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
