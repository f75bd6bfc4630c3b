"""The lean HTTP transport: same failures as the SDK's, replies readable as the SDK's, selectable."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson
import pytest
from pydantic import SecretStr

from octomed_data.distill.engine import distill_shard, reply_fields
from octomed_data.errors import ConfigError
from octomed_data.inference.client import (
    TRANSPORT_ENV,
    EndpointClient,
    OpenAITransport,
    classify,
    request_with_retries,
)
from octomed_data.inference.ratelimit import LocalRateLimiter
from octomed_data.inference.transport_http import Fields, HTTPStatusError, HTTPTransport, parse_completion
from octomed_data.sandbox import FaultConfig, start_sandbox
from octomed_data.teachers import TeacherConfig
from tests.support.distill import config, make_questions, read_raw


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-transport-000000001")


def test_http_failures_classify_as_the_sdk_failures_do() -> None:
    limited = classify(HTTPStatusError(429, "slow down", {"retry-after-ms": "250"}))
    assert str(limited) == "rate limited (429)" and limited.delay == 0.25 and not limited.outage
    down = classify(HTTPStatusError(500, "internal\nerror", {}))
    assert down.retryable and down.outage and str(down) == "HTTP 500: internal error"
    bad = classify(HTTPStatusError(400, "max_tokens too large", {}))
    assert not bad.retryable and not bad.outage and "max_tokens too large" in str(bad)
    for exc in (
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("Response payload is not completed"),
        aiohttp.ClientConnectorError(None, OSError(111, "refused")),  # type: ignore[arg-type]
    ):
        failure = classify(exc)
        assert failure.outage and failure.retryable and str(failure).startswith("connection error (")
    assert (
        classify(aiohttp.ServerTimeoutError()).outage and str(classify(TimeoutError())) == "request timed out"
    )
    with pytest.raises(ValueError) as malformed:
        parse_completion(b'{"id": "x", "choices": [{"mess')
    failure = classify(malformed.value)
    assert failure.retryable and not failure.outage and str(failure).startswith("malformed response")
    with pytest.raises(ValueError):
        parse_completion(b'{"choices": [{"text": "completions API, not chat"}]}')


def test_replies_read_like_sdk_objects() -> None:
    body = {
        "choices": [
            {"message": {"content": "B", "reasoning": "think", "refusal": None}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": 3,
            "completion_tokens": 5,
            "completion_tokens_details": {"reasoning_tokens": 4},
        },
        "system_fingerprint": "fp",
    }
    reply = parse_completion(orjson.dumps(body))
    assert reply.usage.completion_tokens_details.reasoning_tokens == 4 and reply.system_fingerprint == "fp"
    assert reply_fields(reply.choices[0]) == {
        "reasoning": "think", "response": "B", "refusal": None, "finish_reason": "stop"
    }  # fmt: skip
    assert reply.model_extra is None and reply.missing is None and isinstance(reply.choices[0], Fields)
    # Usage a server filled in oddly is treated as absent (the estimate stands), not as a crash.
    assert parse_completion(b'{"choices": [], "usage": {"prompt_tokens": null}}').usage is None


def test_transport_is_selectable(monkeypatch) -> None:
    t = TeacherConfig(name="t", base_url="http://127.0.0.1:9/v1", model="m", server="vllm")
    assert isinstance(EndpointClient(t, SecretStr("k")).transport, HTTPTransport)
    assert isinstance(EndpointClient(t, SecretStr("k"), transport="sdk").transport, OpenAITransport)
    monkeypatch.setenv(TRANSPORT_ENV, "sdk")
    assert isinstance(EndpointClient(t, SecretStr("k")).transport, OpenAITransport)
    with pytest.raises(ConfigError):
        EndpointClient(t, SecretStr("k"), transport="grpc")


def test_http_transport_sends_extra_body_at_the_top_level_and_retries_faults() -> None:
    faults = FaultConfig(seed=2, dropped=0.15, malformed=0.15, server_error=0.15, honour_n=True)
    with start_sandbox(faults=faults) as sb:
        t = TeacherConfig(name="t", base_url=sb.base_url, model="m", server="vllm", timeout_s=10)
        client = EndpointClient(t, SecretStr("sk-test-http-0000000001"), breaker_threshold=100)
        kwargs = {
            "model": "m",
            "messages": [{"role": "user", "content": "A. x\nB. y"}],
            **client.request_fields(7, 2),
        }

        async def main():
            try:
                limiter = LocalRateLimiter.for_teachers([t])
                return await asyncio.gather(
                    *(
                        request_with_retries(
                            client,
                            {**kwargs, "seed": s},
                            max_attempts=6,
                            limiter=limiter,
                            estimate=10,
                            backoff=lambda a, h: 0.01,
                        )
                        for s in range(24)
                    )
                )
            finally:
                await client.close()

        results = asyncio.run(main())
        log = sb.stats()["log"]
    assert all(r[0] is not None and len(r[0].choices) == 2 for r in results)
    assert sum(r[1] for r in results) > 24  # faults were met and retried
    assert {e["fault"] for e in log} >= {"dropped", "malformed", "server_error"}
    # extra_body travels as the SDK sends it: merged into the body's top level.
    assert all(e["n"] == 2 and e["sampling"]["top_k"] == -1 for e in log)


def test_sdk_and_http_transports_store_the_same_samples(tmp_path: Path, monkeypatch) -> None:
    q_uri = str(tmp_path / "q")
    make_questions(q_uri, 6)
    stored = {}
    for name in ("http", "sdk"):
        monkeypatch.setenv(TRANSPORT_ENV, name)
        out = str(tmp_path / name)
        with start_sandbox(faults=FaultConfig(honour_n=True)) as sb:
            report = distill_shard(q_uri, "00000", out, config(sb.base_url, teacher={"supports_n": True}))
        assert report.complete
        keep = (
            "question_id",
            "sample_idx",
            "seed",
            "reasoning",
            "response",
            "finish_reason",
            "completion_tokens",
        )
        stored[name] = sorted(tuple(r[k] for k in keep) for r in read_raw(out))
    assert stored["http"] == stored["sdk"] and len(stored["http"]) == 24
