"""The ``openai`` backend: any OpenAI-compatible endpoint (vLLM, SGLang, hosted APIs, the sandbox).

Requests go through THE request path of the distillation engine
(:func:`octomed_data.inference.client.request_with_retries`: retries, Retry-After, timeouts, key
scrubbing). The key comes from the environment variable named by ``api_key_env`` and is never
logged. The end of thinking is forced with a continuation request: the truncated reasoning + cue
as a final assistant message with ``continue_final_message=True, add_generation_prompt=False``
(vLLM / SGLang chat extras). Endpoints that *hide* reasoning (OpenAI o-series style: no
``reasoning_content``, no inline ``<think>``) return nothing to continue: a budget-exhausted reply
there has no answer and is scored wrong (counted as a parse failure, ``finish_reason=length``),
never forced or guessed.

Sampling is the protocol's and nothing else: vLLM servers fill every field a request leaves out
from the checkpoint's ``generation_config.json``, which would make every seed greedy, so top-k is
off and the repetition penalty 1.0 explicitly, spelled as the server kind accepts it
(:mod:`octomed_data.inference.servers`; never sent where it is rejected).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from pydantic import SecretStr

from evaluation.backends.base import (
    FORCE_CUE,
    THINK_OPEN,
    THINK_PREFILL,
    EndpointUnreachable,
    Generation,
    SamplingProtocol,
    reasoning_span,
    still_thinking,
)
from octomed_data.errors import ConfigError
from octomed_data.inference.replies import read_choice, reasoning_field
from octomed_data.inference.servers import ServerKind, detect_kind, profile
from octomed_data.prompts import build_messages

log = logging.getLogger(__name__)


def sampling_extras_for(kind: ServerKind | str, mode: str) -> dict[str, Any]:
    """The neutral sampling fields (top-k off, no repetition penalty) to send to a server of ``kind``.

    ``auto``: as the kind spells them (nothing for OpenAI, DeepSeek and unknown servers, which
    reject or ignore them); ``off``: nothing; ``on``: the kind's, or vLLM's spelling for a server
    whose kind is unknown (the user vouches that it accepts them).
    """
    if mode == "off":
        return {}
    if mode not in ("auto", "on"):
        raise ConfigError(f"sampling_extras must be auto, on or off, not {mode!r}")
    fields = dict(profile(kind).neutral_sampling)
    if not fields and mode == "on":
        fields = dict(profile(ServerKind.VLLM).neutral_sampling)
    return fields


# --------------------------------------------------------------------------- openai


class OpenAIBackend:
    """Any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, hosted APIs, the sandbox)."""

    name = "openai"
    supports_images = True  # the server decides; a text-only server answers 400 and that is recorded

    def __init__(
        self,
        url: str,
        protocol: SamplingProtocol,
        *,
        served_model_name: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 32,
        timeout_s: float = 600.0,
        max_attempts: int = 4,
        extra_body: Mapping[str, Any] | None = None,
        sampling_extras: str = "auto",
        server: str = "auto",
        opens_think: bool = False,
    ) -> None:
        from octomed_data.inference.client import EndpointClient
        from octomed_data.inference.processor import RequestProcessor
        from octomed_data.inference.retry import Backoff
        from octomed_data.teachers import TeacherConfig, resolve_api_key

        self.url = url.rstrip("/")
        self.protocol = protocol
        self.max_attempts = max_attempts
        self.sampling_extras = sampling_extras
        # The chat template opens the thought in the prompt: replies start inside it.
        self.opens_think = opens_think
        self.api_key_env = api_key_env
        try:
            self._key = resolve_api_key(
                TeacherConfig(name="eval", base_url=self.url, model="-", api_key_env=api_key_env)
            )
        except ConfigError:
            # vLLM/SGLang servers started without --api-key accept any key; hosted APIs answer 401.
            log.info("no API key in $%s: sending a placeholder (fine for local vLLM/SGLang)", api_key_env)
            self._key = SecretStr("EMPTY")
        key = self._key.get_secret_value()
        self.server_kind = detect_kind(self.url, key, server)
        # The user's extra_body wins over the defaults (e.g. a deliberate top_k).
        self.extra_body = {**sampling_extras_for(self.server_kind, sampling_extras), **dict(extra_body or {})}
        self._loop = asyncio.new_event_loop()
        self.failures = 0
        self.successes = 0
        model = served_model_name or self._first_model()
        self.teacher = TeacherConfig(
            name="eval",
            base_url=self.url,
            server=self.server_kind.value,
            model=model,
            api_key_env=api_key_env,
            temperature=protocol.temperature,
            top_p=protocol.top_p,
            max_tokens=protocol.max_new_tokens,
            timeout_s=timeout_s,
            max_in_flight=concurrency,
        )
        self.client = self._loop.run_until_complete(self._open(EndpointClient))
        # THE request processor (retries, limiter, breaker, abort); no journal: nothing to resume.
        self.processor = RequestProcessor(
            {"eval": self.client}, max_attempts=max_attempts, backoff=Backoff(base_s=0.5, max_s=30.0)
        )

    async def _open(self, cls: Any) -> Any:
        return cls(self.teacher, self._key, self.server_kind)  # its semaphore belongs to this backend's loop

    def _first_model(self) -> str:
        """The served model (GET /models); also the up-front reachability check."""
        from octomed_data.inference.client import scrub
        from octomed_data.inference.servers import list_models

        try:
            ids = list_models(self.url, self._key.get_secret_value())
        except ConnectionError as exc:
            msg = scrub(
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__, [self._key.get_secret_value()]
            )
            raise EndpointUnreachable(
                f"cannot list models at {self.url} ({type(exc).__name__}: {msg}); is the server up? "
                "(or pass --served-model-name)"
            ) from None
        if not ids:
            raise EndpointUnreachable(f"{self.url} serves no models; pass --served-model-name")
        return ids[0]

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "endpoint": self.url,
            "server": self.server_kind.value,
            "served_model_name": self.teacher.model,
            "api_key_env": self.api_key_env,  # the variable's name, never its value
            "concurrency": self.teacher.max_in_flight,
            "sampling": {
                "temperature": self.protocol.temperature,
                "top_p": self.protocol.top_p,
                "seed": "per (item, protocol seed)",
                "sampling_extras": self.sampling_extras,
                # Every extra request field except the message-continuation switches.
                "extra_body": dict(self.extra_body),
            },
        }

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.run_until_complete(self.processor.close())
        self._loop.close()

    def generate(self, rows: list[dict[str, Any]], seeds: list[int]) -> list[list[Generation]]:
        return self._loop.run_until_complete(self._agenerate(rows, seeds))

    async def _agenerate(self, rows: list[dict[str, Any]], seeds: list[int]) -> list[list[Generation]]:
        messages = await asyncio.gather(*(asyncio.to_thread(self._messages, r) for r in rows))
        jobs = [self._one(r, m, seed) for seed in seeds for r, m in zip(rows, messages, strict=True)]
        flat = await asyncio.gather(*jobs)
        n = len(rows)
        out = [list(flat[s * n : (s + 1) * n]) for s in range(len(seeds))]
        if self.successes == 0 and self.failures >= min(8, len(flat)):
            errors = {g.error for g in flat if g.error}
            raise EndpointUnreachable(f"every request to {self.url} failed: {sorted(errors)[:3]}")
        return out

    def _messages(self, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        msgs = build_messages(row, prompting=self.protocol.prompting)
        if self.protocol.prefill_think:
            msgs.append({"role": "assistant", "content": THINK_PREFILL})
        return msgs

    async def _request(
        self, messages: list[dict[str, Any]], seed: int, max_tokens: int, continue_final: bool
    ) -> tuple[Any | None, str | None]:
        extra = dict(self.extra_body)
        if continue_final:
            extra.update(continue_final_message=True, add_generation_prompt=False)
        kwargs: dict[str, Any] = {
            "model": self.teacher.model,
            "messages": messages,
            "temperature": self.protocol.temperature,
            "top_p": self.protocol.top_p,
            "max_tokens": max_tokens,
            **self.client.request_fields(seed, 1, extra),
        }
        chars = sum(len(str(m["content"])) for m in messages)
        reply = await self.processor.request(self.client, kwargs, estimate=chars // 4 + max_tokens)
        response, error = reply.response, reply.error
        if response is None:
            self.failures += 1
        else:
            self.successes += 1
        return response, error

    async def _one(self, row: Mapping[str, Any], messages: list[dict[str, Any]], seed: int) -> Generation:
        from octomed_data.inference.client import sample_seed

        p = self.protocol
        request_seed = sample_seed(seed, row["question_id"], 0)
        prefilled = p.prefill_think
        response, error = await self._request(messages, request_seed, p.max_new_tokens, prefilled)
        if response is None:
            return Generation("", 0, 0, "error", error=error)
        opened = prefilled or self.opens_think
        text, finish, tokens, reasoning_tokens = read_reply(response, THINK_PREFILL if opened else "")
        gen = Generation(text, tokens, reasoning_tokens, finish)
        if p.force_end and finish == "length" and still_thinking(text):
            prefix = text + FORCE_CUE
            cont_msgs = [m for m in messages if not (prefilled and m["role"] == "assistant")]
            cont_msgs = cont_msgs + [{"role": "assistant", "content": prefix}]
            cont, error = await self._request(cont_msgs, request_seed, p.force_tokens, True)
            gen.forced_end = True
            gen.finish_reason = "forced"
            if cont is None:
                gen.error = f"forced continuation failed: {error}"
                gen.text = prefix
            else:
                # Raw: a reasoning parser (vLLM deepseek_r1) calls any output without </think>
                # reasoning, so the answer "B}" may come back as reasoning_content.
                c_text, c_tokens = continuation_text(cont)
                gen.text = prefix + c_text
                gen.completion_tokens += c_tokens
        return gen


def continuation_text(response: Any) -> tuple[str, int]:
    """A forced continuation's new text, raw: reasoning field and content joined as generated.

    Raw because a reasoning parser (vLLM deepseek_r1) calls any output without ``</think>``
    reasoning, so the forced answer ``B}`` may come back in the reasoning field.
    """
    msg = response.choices[0].message
    usage = getattr(response, "usage", None)
    text = (reasoning_field(msg) or "") + (msg.content or "")
    return text, int(getattr(usage, "completion_tokens", 0) or 0)


def read_reply(response: Any, prefill: str) -> tuple[str, str, int, int]:
    """(full text with the reasoning in <think>, finish_reason, completion tokens, reasoning tokens)."""
    choice = response.choices[0]
    finish = choice.finish_reason or "stop"
    # THE reply reader (also distillation's): reasoning field, inline <think>, a lone </think>
    # (template-opened thought), or all reasoning (cut mid-thought), put back inline.
    text = read_choice(choice).inline()
    if prefill and not text.lstrip().lower().startswith(THINK_OPEN):
        text = prefill + text
    usage = getattr(response, "usage", None)
    tokens = int(getattr(usage, "completion_tokens", 0) or 0)
    details = getattr(usage, "completion_tokens_details", None)
    reported = getattr(details, "reasoning_tokens", None) if details is not None else None
    if reported:
        return text, finish, tokens, int(reported)
    # No count from the server: the reasoning's share of the completion, by characters.
    span, _ = reasoning_span(text)
    answer_chars = max(0, len(text) - len(span))
    share = len(span) / (len(span) + answer_chars) if span else 0.0
    return text, finish, tokens, round(tokens * share)
