"""What a release must never publish: patient / DICOM identifying metadata and teachers' API keys.

:func:`scrub_metadata` removes patient fields from a question's ``metadata`` JSON (by key, at any
depth); :func:`image_metadata_chunks` names what an image file carries besides its pixels (EXIF,
text, time, ICC profile chunks or segments), which a released image must not; :class:`SecretGuard`
refuses any text (or bytes) holding the value of a teacher's API key variable.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import SecretStr

from octomed_data.errors import ConfigError

_MIN_SECRET_CHARS = 8  # shorter values would match ordinary text

# Patient and DICOM identifying fields (DICOM PS3.15 basic profile, the usual spellings): a key
# whose letters and digits, lowercased, are one of these (or hold "patient") is removed from
# ``metadata``, as is any key spelled as a DICOM tag ("(0010,0010)", "00100010").
_PHI_KEYS = frozenset(
    """patientname patientid patientsname patientbirthdate patientbirthtime patientsex patientage
    patientaddress patienttelephonenumbers otherpatientids otherpatientnames accessionnumber
    institutionname institutionaddress referringphysicianname performingphysicianname
    operatorsname physiciansofrecord studydate studytime seriesdate seriestime acquisitiondate
    acquisitiontime contentdate contenttime studyid studyinstanceuid seriesinstanceuid
    sopinstanceuid frameofreferenceuid deviceserialnumber stationname medicalrecordnumber mrn
    ssn dateofbirth dob birthdate issuerofpatientid ethnicgroup""".split()
)
_DICOM_TAG = re.compile(r"^\(?\s*[0-9a-fA-F]{4}\s*,?\s*[0-9a-fA-F]{4}\s*\)?$")


def is_patient_key(key: str) -> bool:
    """Whether a metadata key names a patient / DICOM identifying field."""
    norm = re.sub(r"[^a-z0-9]", "", key.lower())
    return "patient" in norm or norm in _PHI_KEYS or bool(_DICOM_TAG.match(key.strip()))


def _scrub(value: Any, dropped: Counter[str]) -> Any:
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if is_patient_key(str(k)):
                dropped[str(k)] += 1
            else:
                out[k] = _scrub(v, dropped)
        return out
    if isinstance(value, list):
        return [_scrub(v, dropped) for v in value]
    return value


def scrub_metadata(text: str | None, dropped: Counter[str]) -> str | None:
    """A question's metadata JSON without patient fields (counted by key in ``dropped``)."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:  # not JSON: nothing structured to keep, and it could hold anything
        dropped["<unparseable metadata>"] += 1
        return None
    clean = _scrub(data, dropped)
    return json.dumps(clean, ensure_ascii=False, sort_keys=True) if clean else None


# PNG chunks that hold pixels or how to show them, nothing else (PNG 1.2 / 3rd edition). Any other
# chunk (tEXt, zTXt, iTXt, eXIf, tIME, iCCP, private ones) can carry text about the source.
_PNG_PIXEL_CHUNKS = frozenset(
    b"IHDR PLTE IDAT IEND tRNS gAMA cHRM sRGB sBIT bKGD pHYs hIST sPLT cICP mDCV cLLI".split()
)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG segments that are pixels or how to decode them: SOFn, DHT, DAC, DQT, DRI, SOS, RSTn,
# DNL, EXP, and APP0 (JFIF). APP1 (EXIF/XMP), APP2 (ICC), APP13 (IPTC), COM (comments), ... are not.
_JPEG_PIXEL_MARKERS = frozenset([*range(0xC0, 0xD0), 0xDB, 0xDD, 0xDA, 0xDC, 0xDF, 0xE0])


def image_metadata_chunks(data: bytes) -> list[str]:
    """What a PNG or JPEG file holds besides its pixels: the names of its metadata chunks (PNG:
    ``tEXt``, ``eXIf``, ``tIME``, ...) or segments (JPEG: ``APP1``, ``COM``, ...); empty when it
    holds pixels only. Another format, or a file that does not parse, is reported as such."""
    if data.startswith(_PNG_SIGNATURE):
        found, pos = [], len(_PNG_SIGNATURE)
        while pos + 8 <= len(data):
            (length,) = struct.unpack(">I", data[pos : pos + 4])
            kind = data[pos + 4 : pos + 8]
            if kind not in _PNG_PIXEL_CHUNKS and kind.decode("latin-1") not in found:
                found.append(kind.decode("latin-1"))
            pos += 12 + length
            if kind == b"IEND":
                return found + (["data after IEND"] if pos < len(data) else [])
        return found + ["truncated PNG"]
    if data.startswith(b"\xff\xd8"):
        found, pos = [], 2
        while pos + 4 <= len(data):
            if data[pos] != 0xFF:
                return found + ["unparseable JPEG"]
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte before a marker
                pos += 1
                continue
            if marker == 0xD9:  # end of image
                return found
            if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length
                pos += 2
                continue
            (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
            if marker not in _JPEG_PIXEL_MARKERS:
                found.append(
                    "COM" if marker == 0xFE else f"APP{marker - 0xE0}" if marker >= 0xE0 else hex(marker)
                )
            if marker == 0xDA:  # entropy-coded data follows: metadata segments come before it
                return found
            pos += 2 + length
        return found + ["truncated JPEG"]
    return ["not a PNG or JPEG file"]


class SecretGuard:
    """Refuses rows holding a teacher's API key (the values of the teachers' key variables)."""

    def __init__(self, secrets: Mapping[str, SecretStr]) -> None:
        self.secrets = {k: v for k, v in secrets.items() if len(v.get_secret_value()) >= _MIN_SECRET_CHARS}

    @classmethod
    def from_env(cls, env_names: Iterable[str]) -> SecretGuard:
        return cls({n: SecretStr(os.environ[n]) for n in sorted(set(env_names)) if os.environ.get(n)})

    def check(self, text: str, where: str) -> None:
        for name, secret in self.secrets.items():
            if secret.get_secret_value() in text:
                raise ConfigError(f"{where} holds the API key of ${name}; not published")

    def check_bytes(self, data: bytes, where: str) -> None:
        """:meth:`check` for binary content (an image file)."""
        for name, secret in self.secrets.items():
            if secret.get_secret_value().encode("utf-8") in data:
                raise ConfigError(f"{where} holds the API key of ${name}; not published")
