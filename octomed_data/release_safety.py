"""What a release must never publish: patient / DICOM identifying metadata and teachers' API keys.

:func:`scrub_metadata` removes patient fields from a question's ``metadata`` JSON (by key, at any
depth); :class:`SecretGuard` refuses any text holding the value of a teacher's API key variable.
"""

from __future__ import annotations

import json
import os
import re
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
