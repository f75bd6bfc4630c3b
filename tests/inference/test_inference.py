"""The inference package: reading replies (recorded real server bodies too), server kinds.

The client, its errors, retries and breaker: ``tests/inference/test_client.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from octomed_data.answers import extract_answer
from octomed_data.inference import servers
from octomed_data.inference.replies import Reply, read_choice, split_reasoning
from octomed_data.inference.servers import ServerKind, detect_kind, probe_kind
from octomed_data.sandbox import start_sandbox
from tests.support.inference import recorded


def test_split_reasoning_every_form() -> None:
    assert split_reasoning("Final answer: C", "because...") == Reply("because...", "Final answer: C")
    assert split_reasoning("<think>step 1\nstep 2</think>\n\nAnswer: B") == Reply(
        "step 1\nstep 2", "Answer: B"
    )
    assert split_reasoning("<think>cut off mid-thought") == Reply("cut off mid-thought", "", closed=False)
    assert split_reasoning("reasoning only</think>Answer: A") == Reply("reasoning only", "Answer: A")
    assert split_reasoning("Answer: D") == Reply(None, "Answer: D")
    assert split_reasoning(None) == Reply(None, "")
    # A parser that never saw </think>: all reasoning, no answer; cut by the budget = still thinking.
    assert split_reasoning(None, "weighing A vs B", "length") == Reply("weighing A vs B", "", closed=False)
    assert split_reasoning(None, "weighing A vs B", "stop") == Reply("weighing A vs B", "", closed=True)
    assert Reply("R", "", closed=False).inline() == "<think>R"
    assert Reply("R", "Answer: B").inline() == "<think>R</think>\n\nAnswer: B"


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_reasoning_field_of_sdk_objects_and_dicts(field: str) -> None:
    import openai.types.chat as t

    body = {
        "id": "x", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "Answer: B", field: "B fits best"}}],
    }  # fmt: skip
    sdk = t.ChatCompletion.model_validate(body)
    for choice in (sdk.choices[0], body["choices"][0]):
        assert read_choice(choice) == Reply("B fits best", "Answer: B")


def test_recorded_vllm_bodies_keep_their_reasoning() -> None:
    """Real vLLM 0.32 (CPU) bodies with --reasoning-parser deepseek_r1: reasoning is in `reasoning`."""
    n2 = recorded("vllm-0.32-cpu_n2_seeded.json")
    assert n2["status"] == 200 and len(n2["body"]["choices"]) == 2
    for choice in n2["body"]["choices"]:
        assert "reasoning_content" not in choice["message"] and choice["message"]["reasoning"]
        reply = read_choice(choice)
        assert reply.reasoning == choice["message"]["reasoning"]
        assert reply.answer == (choice["message"]["content"] or "").strip()
        # Cut by the budget: no answer is read from it, whatever it says.
        assert choice["finish_reason"] == "length"
    unseeded = recorded("vllm-0.32-cpu_unseeded.json")["body"]["choices"][0]
    assert read_choice(unseeded).reasoning == unseeded["message"]["reasoning"]
    # The same bodies through the OpenAI SDK (what distillation and evaluation receive).
    import openai.types.chat as t

    sdk = t.ChatCompletion.model_validate(n2["body"])
    assert [read_choice(c).reasoning for c in sdk.choices] == [
        c["message"]["reasoning"] for c in n2["body"]["choices"]
    ]


def test_recorded_vllm_continuation_is_read_raw() -> None:
    from evaluation.backends.openai import continuation_text

    body = recorded("vllm-0.32-cpu_continuation.json")["body"]
    import openai.types.chat as t

    text, tokens = continuation_text(t.ChatCompletion.model_validate(body))
    msg = body["choices"][0]["message"]
    assert (
        text == (msg.get("reasoning") or "") + (msg.get("content") or "")
        and tokens == body["usage"]["completion_tokens"]
    )


def test_server_kinds_are_detected_from_what_servers_say() -> None:
    assert probe_kind("https://api.openai.com/v1") == ServerKind.OPENAI
    assert probe_kind("https://res.openai.azure.com/openai") == ServerKind.OPENAI
    assert probe_kind("https://api.deepseek.com/v1") == ServerKind.DEEPSEEK
    for like, kind in (
        ("vllm", ServerKind.VLLM),
        ("llamacpp", ServerKind.LLAMACPP),
        ("generic", ServerKind.GENERIC),
    ):
        with start_sandbox(server=like) as sb:
            assert probe_kind(sb.base_url) == kind
            servers.forget(sb.base_url)
            assert detect_kind(sb.base_url) == kind
            assert detect_kind(sb.base_url, configured="sglang") == ServerKind.SGLANG
    # Unreachable: generic for now (only OpenAI API fields), asked again next time (not cached).
    assert probe_kind("http://127.0.0.1:9/v1") is None
    assert detect_kind("http://127.0.0.1:9/v1") == ServerKind.GENERIC
    assert "http://127.0.0.1:9/v1" not in servers._detected


def test_sandbox_answers_as_llamacpp_and_vllm() -> None:
    from tests.support.sandbox import OPTIONS, PROMPT, post

    with start_sandbox(server="llamacpp") as sb:
        status, body, _ = post(sb.base_url, {"model": "m", "messages": PROMPT, "top_k": -1})
        assert status == 500 and "greater than or equal to 0" in body["error"]["message"]
        status, body, _ = post(sb.base_url, {"model": "m", "messages": PROMPT, "top_k": 0, "n": 3})
        assert status == 200 and len(body["choices"]) == 1  # llama.cpp ignores n
    with start_sandbox(server="vllm", reasoning_field="reasoning", style="reasoning_content") as sb:
        status, body, _ = post(sb.base_url, {"model": "m", "messages": PROMPT, "n": 2, "seed": 1})
        assert status == 200 and len(body["choices"]) == 2
        msg = body["choices"][0]["message"]
        assert "reasoning_content" not in msg and msg["reasoning"]
        assert extract_answer(read_choice(body["choices"][0]).answer, "text_mcq", OPTIONS).answer in {
            "A",
            "B",
            "C",
        }


def test_distill_keeps_reasoning_sent_as_message_reasoning(tmp_path: Path, monkeypatch) -> None:
    """The data-loss bug: vLLM >= 0.10 sends `reasoning`; every stored row must keep it."""
    from octomed_data.distill.engine import distill_shard
    from octomed_data.sandbox import SANDBOX_MARK
    from tests.support.distill import config, make_questions, read_raw

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-reasoning-000000001")
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    make_questions(q_uri, 10)
    with start_sandbox(server="vllm", reasoning_field="reasoning", style="reasoning_content") as sb:
        report = distill_shard(q_uri, "00000", out, config(sb.base_url))
    rows = read_raw(out, q_uri)  # with the filter stage's verdicts
    assert report.complete and len(rows) == 40 and report.requests == 10  # detected vLLM: n=4 per request
    assert all(r["reasoning"] and r["reasoning"].startswith(SANDBOX_MARK) for r in rows)
    assert all(r["response"] and r["extracted_answer"] for r in rows)


def test_sampling_extras_off_sends_nothing_even_to_vllm(shared_data, tmp_path: Path) -> None:
    from evaluation.harness import evaluate
    from octomed_data.job_config import EvalConfig

    with start_sandbox(server="vllm") as sb:
        cfg = EvalConfig(
            model=sb.base_url, benchmarks="medqa", data_dir=str(shared_data), output_uri=str(tmp_path / "e"),
            limit=2, seeds=1, sampling_extras="off",
        )  # fmt: skip
        evaluate(cfg, progress=False)
        log = sb.stats()["log"]
    assert log and not any("top_k" in e["sampling"] or "repetition_penalty" in e["sampling"] for e in log)
