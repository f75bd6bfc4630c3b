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


# How a key's character may be spelled where it leaks: itself, percent-encoded (once or twice,
# either hex case: ``quote``, ``quote_plus``, a full encoder's ``%2D``), or JSON-escaped
# (``\u002d``, ``\/``); a space also as ``+`` (``quote_plus``).
def _char_forms(char: str) -> str:
    alts = [re.escape(char)]
    alts.append("".join(f"%(?:25)?(?i:{b:02x})" for b in char.encode("utf-8")))
    alts.append(rf"\\u(?i:{ord(char):04x})" if ord(char) <= 0xFFFF else "")
    if char == " ":
        alts.append(r"\+")
    if char in '/\\"':
        alts.append(re.escape("\\" + char))
    return "(?:" + "|".join(a for a in alts if a) + ")"


def _base64_cores(secret: str) -> list[str]:
    """The base64 characters (standard and URL-safe) that any base64 text holding ``secret`` holds,
    whatever the key's offset in the encoded bytes (0, 1 or 2 mod 3): the encoding of the complete
    3-byte groups made only of the key's bytes."""
    import base64

    data, cores = secret.encode("utf-8"), []
    for offset, skip in ((0, 0), (1, 2), (2, 3)):
        padded = b"\0" * offset + data
        whole = padded[: len(padded) - len(padded) % 3]
        core = base64.b64encode(whole).decode("ascii")[skip:]
        for form in (core, core.translate(str.maketrans("+/", "-_"))):
            if len(form) >= _MIN_SECRET_CHARS and form not in cores:
                cores.append(form)
    return cores


def secret_forms(secret: str) -> list[str]:
    """The spellings of ``secret`` a scan looks for, before per-character escapes: the key itself
    and the base64 cores of :func:`_base64_cores` (each also matched URL-encoded or JSON-escaped)."""
    return [secret, *_base64_cores(secret)]


def secret_pattern(secrets: Iterable[str]) -> re.Pattern[str] | None:
    """One regex finding any of ``secrets`` raw, URL-encoded (``quote``, ``quote_plus``, ``%2D``,
    twice-encoded), JSON-escaped, or base64 (standard or URL-safe, any alignment; those forms URL-
    encoded or JSON-escaped too). None when no secret is long enough to scan for."""
    forms = sorted(
        {f for s in secrets if len(s) >= _MIN_SECRET_CHARS for f in secret_forms(s)}, key=len, reverse=True
    )
    if not forms:
        return None
    return re.compile("|".join("".join(_char_forms(c) for c in form) for form in forms))


REDACTED = "[redacted key]"
# The reject reason of a teacher reply that held a key (scrubbed before it was stored).
SECRET_IN_REPLY = "secret_in_reply"


def scrub_secrets(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every spelling of every secret (see :func:`secret_pattern`) replaced."""
    pattern = secret_pattern(secrets)
    return text if pattern is None or not text else pattern.sub(REDACTED, text)


_KEY_NAME = re.compile(r"(_API_KEY|_TOKEN|SECRET|PASSWORD|_ACCESS_KEY)", re.I)


class SecretGuard:
    """Finds, refuses or scrubs a teacher's API key (the values of the teachers' key variables) in
    text or bytes, in every encoding :func:`secret_pattern` knows: the one key scan of releases,
    exports, training data and stored replies."""

    def __init__(self, secrets: Mapping[str, SecretStr]) -> None:
        self.secrets = {k: v for k, v in secrets.items() if len(v.get_secret_value()) >= _MIN_SECRET_CHARS}
        self._patterns = {name: secret_pattern([v.get_secret_value()]) for name, v in self.secrets.items()}
        self._any = secret_pattern(v.get_secret_value() for v in self.secrets.values())

    @classmethod
    def from_env(cls, env_names: Iterable[str]) -> SecretGuard:
        return cls({n: SecretStr(os.environ[n]) for n in sorted(set(env_names)) if os.environ.get(n)})

    @classmethod
    def from_process_env(cls) -> SecretGuard:
        """A guard over every variable of this process whose name says it holds a key
        (``*_API_KEY``, ``*_TOKEN``, ``*SECRET*``, ``*PASSWORD*``): for error texts written to
        state, where the stage's own teachers are not at hand."""
        return cls.from_env(n for n in os.environ if _KEY_NAME.search(n))

    @classmethod
    def of_values(cls, values: Mapping[str, str]) -> SecretGuard:
        """A guard over plain ``name -> key`` values (a stage's clients' keys)."""
        return cls({n: SecretStr(v) for n, v in values.items() if v})

    def __bool__(self) -> bool:
        return bool(self.secrets)

    def find(self, text: str | None) -> str | None:
        """The name of the first key ``text`` holds (in any encoding), or None."""
        if not text or self._any is None or self._any.search(text) is None:
            return None
        return next(name for name, p in self._patterns.items() if p is not None and p.search(text))

    def find_bytes(self, data: bytes) -> str | None:
        """:meth:`find` for binary content (bytes read as Latin-1: an ASCII key reads as itself)."""
        found = self.find(data.decode("latin-1"))
        if found is None and data:
            found = self.find(data.decode("utf-8", "replace"))
        return found

    def scrub(self, text: str | None) -> str | None:
        """``text`` with every spelling of every key replaced by :data:`REDACTED`."""
        if not text or self._any is None:
            return text
        return self._any.sub(REDACTED, text)

    def scrub_row(self, row: dict[str, Any], columns: Iterable[str] | None = None) -> list[str]:
        """Scrub every text value of ``row`` (or of its ``columns``) in place, lists and dicts too;
        returns the columns that held a key."""
        hit = []
        for column in list(row) if columns is None else [c for c in columns if c in row]:
            value = row[column]
            clean = self._scrub_value(value)
            if clean != value:
                row[column] = clean
                hit.append(column)
        return hit

    def _scrub_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, list):
            return [self._scrub_value(v) for v in value]
        if isinstance(value, dict):
            return {k: self._scrub_value(v) for k, v in value.items()}
        return value

    def check(self, text: str, where: str) -> None:
        name = self.find(text)
        if name is not None:
            raise ConfigError(f"{where} holds the API key of ${name}; not published")

    def check_bytes(self, data: bytes, where: str) -> None:
        """:meth:`check` for binary content (an image file)."""
        name = self.find_bytes(data)
        if name is not None:
            raise ConfigError(f"{where} holds the API key of ${name}; not published")
