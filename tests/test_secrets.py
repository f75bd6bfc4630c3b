"""One key scan, in every encoding: :class:`SecretGuard` finds and scrubs a teacher's key raw,
URL-encoded, base64 and JSON-escaped; replies are scrubbed when stored, so a reflecting teacher's key
reaches no byte of the run, its exports or its release, and the rejected samples are counted."""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.parse
from importlib import resources
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr

from octomed_data.errors import ConfigError
from octomed_data.release_safety import REDACTED, SECRET_IN_REPLY, SecretGuard, scrub_secrets
from tests.support.reflect import key_spellings

KEY = "sk-proj-Zq8v-3f9A_b7Kx/2mN+pW0e"


def spellings(key: str) -> dict[str, str]:
    raw = key.encode()
    out = {
        "raw": key,
        "quote": urllib.parse.quote(key, safe=""),
        "quote_plus": urllib.parse.quote_plus(key),
        "quote_keeps_slash": urllib.parse.quote(key),
        "percent_2D": key.replace("-", "%2D"),
        "percent_lower": re.sub(
            r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), urllib.parse.quote(key, safe="")
        ),
        "every_byte": "".join(f"%{b:02X}" for b in raw),
        "twice": urllib.parse.quote(urllib.parse.quote(key, safe=""), safe=""),
        "json": json.dumps(key),
        "json_unicode": "".join(f"\\u{ord(c):04x}" for c in key),
        "json_slash": key.replace("/", "\\/"),
    }
    for pad in ("", "a", "ab"):  # the key at each offset mod 3 of the encoded bytes
        for name, enc in (("b64", base64.b64encode), ("b64url", base64.urlsafe_b64encode)):
            for tail in ("", "!", "!?"):
                out[f"{name}_{len(pad)}_{len(tail)}"] = enc((pad + key + tail).encode()).decode()
            out[f"{name}_{len(pad)}_nopad"] = enc((pad + key).encode()).decode().rstrip("=")
    out["b64_quoted"] = urllib.parse.quote(base64.b64encode(raw).decode(), safe="")
    return out


@pytest.mark.parametrize("form", sorted(spellings(KEY)))
def test_every_spelling_of_the_key_is_found_and_scrubbed(form):
    guard = SecretGuard({"TEACHER_KEY": SecretStr(KEY)})
    text = f"before {spellings(KEY)[form]} after"
    assert guard.find(text) == "TEACHER_KEY"
    with pytest.raises(ConfigError, match=r"\$TEACHER_KEY"):
        guard.check(text, "row 3")
    with pytest.raises(ConfigError):
        guard.check_bytes(text.encode(), "image 1")
    clean = guard.scrub(text)
    assert REDACTED in clean and guard.find(clean) is None
    assert clean.startswith("before ") and clean.endswith(" after")
    assert scrub_secrets(text, [KEY]) == clean


def test_ordinary_text_and_parts_of_the_key_are_not_keys():
    guard = SecretGuard({"TEACHER_KEY": SecretStr(KEY)})
    for text in (
        "max_tokens sk-proj and %2D in a URL",
        KEY[:-1],
        base64.b64encode(KEY[:6].encode()).decode(),
        "Final answer: \\boxed{B}",
    ):
        assert guard.find(text) is None
        assert guard.scrub(text) == text
    assert not SecretGuard({"SHORT": SecretStr("abc")})  # shorter than 8 characters: not scanned
    assert SecretGuard({}).scrub("x") == "x" and SecretGuard({}).find("x") is None


def test_scrub_row_scrubs_nested_values_of_the_named_columns():
    guard = SecretGuard.of_values({"K": KEY})
    row = {"question_id": "q1", "response": f"key {KEY}", "error": None, "extra": [{"a": KEY}]}
    assert guard.scrub_row(row, ["response", "error", "missing"]) == ["response"]
    assert row["response"] == f"key {REDACTED}" and row["extra"] == [{"a": KEY}]
    assert guard.scrub_row(row) == ["extra"] and row["extra"] == [{"a": REDACTED}]


def test_a_failed_request_error_is_scrubbed_and_stays_a_failure():
    from octomed_data.distill.engine import guard_reply_row
    from octomed_data.distill.journal import FAILED

    guard = SecretGuard.of_values({"K": KEY})
    failed = {"reject_reason": FAILED, "error": "HTTP 401: bad key " + urllib.parse.quote(KEY, safe="")}
    guard_reply_row(guard, failed)
    assert failed["reject_reason"] == FAILED and guard.find(failed["error"]) is None
    reply = {"reject_reason": None, "reasoning": base64.b64encode(KEY.encode()).decode(), "response": "B"}
    guard_reply_row(guard, reply)
    assert reply["reject_reason"] == SECRET_IN_REPLY and guard.find(reply["reasoning"]) is None


# --------------------------------------------------------------------------------------------
# End to end: a teacher that reflects its key, distill -> filter -> mixture -> export -> release.
# --------------------------------------------------------------------------------------------

CANARY = "sk-reflect-canary-4be1d07a9c3f"


def _decoded_views(text: str) -> list[str]:
    """``text`` as stored and decoded every way a key could hide in it (independent of the guard):
    percent-decoded once and twice (+ as space too), JSON escapes read, base64 runs decoded."""
    views = [text, urllib.parse.unquote(text), urllib.parse.unquote(urllib.parse.unquote(text))]
    views.append(urllib.parse.unquote_plus(text))
    views.append(re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text).replace("\\/", "/"))
    for view in list(views):
        for run in re.findall(r"[A-Za-z0-9+/_-]{12,}={0,2}", view):
            run = run.replace("-", "+").replace("_", "/").rstrip("=")
            for start in range(4):
                part = run[start:]
                part = part[:-1] if len(part) % 4 == 1 else part
                part += "=" * (-len(part) % 4)
                try:
                    views.append(base64.b64decode(part).decode("latin-1"))
                except ValueError:
                    pass
    return views


def key_hits(root: Path, key: str) -> list[str]:
    """Every file under ``root`` (Parquet values read with pyarrow, zstd journals decompressed)
    whose bytes hold ``key`` in any spelling."""
    import pyarrow as pa

    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        texts = [data.decode("latin-1"), data.decode("utf-8", "replace")]
        if path.suffix == ".zst":
            texts.append(
                pa.CompressedInputStream(pa.BufferReader(data), "zstd")
                .read()
                .to_pybytes()
                .decode("utf-8", "replace")
            )
        if path.suffix == ".parquet":
            rows = pq.read_table(path).to_pylist()
            texts.append(json.dumps(rows, default=str, ensure_ascii=False))
            texts += [v.decode("latin-1") for r in rows for v in _bytes_in(r)]
        if any(key in view for text in texts for view in _decoded_views(text)):
            hits.append(str(path.relative_to(root)))
    return hits


def _bytes_in(value):
    if isinstance(value, bytes):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _bytes_in(v)
    elif isinstance(value, list):
        for v in value:
            yield from _bytes_in(v)


@pytest.fixture
def canary(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    return CANARY


def test_the_detector_of_this_test_finds_every_reflected_spelling(tmp_path):
    for i, form in enumerate(key_spellings(CANARY)):
        (tmp_path / f"{i}.txt").write_text(f"x {form} y")
    assert len(key_hits(tmp_path, CANARY)) == len(key_spellings(CANARY))


def test_a_reflecting_teachers_key_reaches_no_byte_of_the_run_exports_or_release(canary, tmp_path):
    from octomed_data import storage
    from octomed_data.release import release
    from octomed_data.stages import LocalExecutor, raise_for_failures, run_stage
    from octomed_data.stages.mixture import ExportStage, MixtureStage
    from tests.support.release import build_run

    data = resources.files("octomed_data") / "sample_data"
    entries = [
        {
            "name": "medqa",
            "format": "medqa",
            "input": str(data / "medqa/phrases_no_exclude_test.head8.jsonl"),
        },
        {
            "name": "modality",
            "format": "imaging",
            "input": str(data / "imaging/labels.csv"),
            "options": {"per_class": 2},
        },
    ]
    reflected: list[str] = []
    paths = build_run(tmp_path / "store", entries, decontam=False, demo_sources=False, reflected=reflected)
    for stage in (MixtureStage(paths), ExportStage(paths)):
        raise_for_failures(run_stage(stage, LocalExecutor(progress=False)))
    out = tmp_path / "store" / "release"
    result = release(paths, str(out))
    assert reflected and result.rows > 0  # the teacher reflected its key; clean rows were released
    stats = json.loads(storage.read_bytes(paths.stats))
    counted = stats["overall"]["reject_reasons"] if "overall" in stats else stats["reject_reasons"]
    assert counted.get(SECRET_IN_REPLY) == len(reflected)
    assert sum(1 for _ in (tmp_path / "store").rglob("*.parquet")) > 10
    assert os.path.isdir(paths.export.removeprefix("file://"))
    assert key_hits(tmp_path / "store", CANARY) == []


def test_attempt_records_scrub_every_encoding_of_a_process_key(tmp_path, monkeypatch):
    """Issue 25: an error text written to ``state/<stage>/<shard>.json`` that quotes a key held in
    this process's environment (URL-encoded, base64, raw) keeps none of it; other text stays."""
    import base64
    import urllib.parse

    from octomed_data.layout import RunPaths
    from octomed_data.stages.records import record_shard

    key = "sk-state-0123456789abcdefXYZ"
    monkeypatch.setenv("DEEPSEEK_API_KEY", key)
    error = (
        f"HTTP 401 for https://t/v1?key={urllib.parse.quote(key, safe='')} "
        f"auth={base64.b64encode(key.encode()).decode()} raw={key} model=r1"
    )
    paths = RunPaths.at(str(tmp_path / "run"))
    record_shard(paths, "distill", "00000", "FAILED", attempt=1, error=error)
    text = (tmp_path / "run" / "state" / "distill" / "00000.json").read_text()
    assert "model=r1" in text and "HTTP 401" in text
    assert SecretGuard.of_values({"K": key}).find(text) is None, text
    assert "sk-state" not in text and urllib.parse.quote(key, safe="") not in text
