"""Generation backends for evaluation behind one small interface: ``hf``, ``openai`` and ``vllm``.

A backend turns question rows into :class:`Generation` s for several seeds at once
(``generate(rows, seeds)``), with the protocol's sampling settings, and forces the end of
thinking when the budget runs out: a reply still inside ``<think>`` after ``max_new_tokens``
gets ``</think>`` plus an answer cue (:data:`FORCE_CUE`) appended and a short continuation
(``force_tokens``) generated, so an over-long reasoner is scored on an answer rather than on
nothing. ``Generation.text`` is the full reply (reasoning in ``<think>...</think>``, cue and
continuation included) and ``forced_end`` records that it was forced.

* ``hf``: a local model folder, or an ``s3://`` / ``file://`` checkpoint with ``checkpoint.json``
  (downloaded once); ``transformers`` generate with seeded sampling. Works on CPU.
* ``openai``: any OpenAI-compatible endpoint through THE request path of the distillation engine
  (:func:`octomed_data.inference.client.request_with_retries`: retries, Retry-After, timeouts,
  key scrubbing). The key comes from the environment variable named by ``api_key_env`` and is
  never logged. The end of thinking is forced with a continuation request: the truncated
  reasoning + cue as a final assistant message with ``continue_final_message=True,
  add_generation_prompt=False`` (vLLM / SGLang chat extras). Endpoints that *hide* reasoning
  (OpenAI o-series style: no ``reasoning_content``, no inline ``<think>``) return nothing to
  continue: a budget-exhausted reply there has no answer and is scored wrong (counted as a parse
  failure, ``finish_reason=length``), never forced or guessed.
* ``vllm``: the checkpoint served by a vLLM OpenAI server started from vLLM's own environment
  (:mod:`octomed_data.inference.vllm_service`; vLLM's pins exclude this project's, so it never
  shares its venv), then the ``openai`` path against it with enough requests in flight that the
  server batches them as offline ``vllm.LLM`` would. Works on a GPU and, with the CPU build, here.

Sampling is the protocol's and nothing else: a checkpoint's ``generation_config.json`` carries the
base model's chat defaults (Qwen2.5-VL-7B-Instruct: ``top_k 1``, ``top_p 0.001``, ``temperature
0.1``, ``repetition_penalty 1.05``; fine-tuned checkpoints keep that file), and HF ``generate`` and
vLLM servers fill every field a request leaves out from it, which would make every seed greedy.
So top-k is off and the repetition penalty 1.0 explicitly, in all three backends (spelled as the
server kind accepts it, :mod:`octomed_data.inference.servers`; never sent where it is rejected); only the stop
tokens (the config's eos list plus the tokenizer's) are taken from the checkpoint. Each backend's
``describe()["sampling"]`` records the settings in effect (and, for ``hf``, the checkpoint's
sampling fields that were ignored).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import SecretStr

from octomed_data import storage
from octomed_data.errors import ConfigError, OctomedError
from octomed_data.inference.replies import read_choice, reasoning_field
from octomed_data.inference.servers import ServerKind, detect_kind, profile
from octomed_data.prompts import build_messages, render_question, system_prompt

log = logging.getLogger(__name__)

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# Appended when the budget ran out mid-thought: close the thought, then open the answer box so
# that the short continuation is the answer itself (read by THE extraction module).
FORCE_CUE = "\n</think>\n\nFinal answer: \\boxed{"
THINK_PREFILL = "<think>\n"
# Checkpoint generation_config fields that change sampling: recorded when the protocol overrides them.
_SAMPLING_FIELDS = (
    "do_sample", "temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty",
    "no_repeat_ngram_size", "epsilon_cutoff", "eta_cutoff", "num_beams",
)  # fmt: skip


class EndpointUnreachable(OctomedError):
    """The evaluation endpoint cannot be reached or refuses every request."""


@dataclass(frozen=True)
class SamplingProtocol:
    """The sampling protocol a backend applies (the paper's defaults live in EvalConfig)."""

    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 8192
    force_end: bool = True
    force_tokens: int = 64
    prompting: str = "cot"
    prefill_think: bool = False


@dataclass
class Generation:
    """One reply: full text, token counts, how it ended, whether the end of thinking was forced."""

    text: str
    completion_tokens: int
    reasoning_tokens: int
    finish_reason: str  # stop | length | error
    forced_end: bool = False
    error: str | None = None


class Backend(Protocol):
    """What the harness needs from a model: replies for rows under several seeds."""

    name: str
    supports_images: bool

    def generate(self, rows: list[dict[str, Any]], seeds: list[int]) -> list[list[Generation]]:
        """``out[s][i]``: the reply to ``rows[i]`` sampled with ``seeds[s]``."""
        ...

    def describe(self) -> dict[str, Any]:
        """Secret-free facts about the backend for metrics.json (model, endpoint, dtype ...)."""
        ...

    def close(self) -> None: ...


def still_thinking(text: str) -> bool:
    """Whether ``text`` ends inside a thought: a ``<think>`` with no ``</think>`` after it."""
    low = text.lower()
    start = low.rfind(THINK_OPEN)
    return start >= 0 and low.find(THINK_CLOSE, start) < 0


def template_opens_think(tokenizer: Any) -> bool:
    """Whether the chat template opens the thought in the generation prompt (R1, Qwen3 templates):
    the reply then starts inside it although it carries no ``<think>`` of its own."""
    probe = [{"role": "user", "content": "x"}]
    with_gen = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    without = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=False)
    return still_thinking(with_gen[len(without) :])


def chat_messages(row: Mapping[str, Any], prompting: str = "cot") -> list[dict[str, Any]]:
    """The teacher prompt for ``row`` as chat messages for a local model (image parts first)."""
    text = render_question(row)
    images = row.get("images") or []
    user: Any = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}] if images else text
    return [
        {"role": "system", "content": system_prompt(row["task_type"], prompting)},
        {"role": "user", "content": user},
    ]


def auto_backend(model: str, backend: str = "auto") -> str:
    """``backend`` unless ``auto``: an http(s) URL -> ``openai``, anything else -> ``hf``."""
    if backend != "auto":
        return backend
    return "openai" if model.startswith(("http://", "https://")) else "hf"


def make_backend(
    kind: str, model: str, protocol: SamplingProtocol, *, options: Mapping[str, Any], cache_dir: Path
) -> Backend:
    """Build the backend ``kind`` for ``model``; bad paths / unreachable endpoints raise ``ConfigError``."""
    if kind == "hf":
        return HFBackend(model, protocol, cache_dir=cache_dir, **options.get("hf", {}))
    if kind == "openai":
        return OpenAIBackend(model, protocol, **options.get("openai", {}))
    if kind == "vllm":
        return VLLMBackend(model, protocol, cache_dir=cache_dir, **options.get("vllm", {}))
    raise ConfigError(f"unknown backend {kind!r}; expected hf, openai or vllm")


# --------------------------------------------------------------------------- checkpoints


def resolve_checkpoint(checkpoint_uri: str, cache_dir: Path) -> Path:
    """A local folder holding the model: a folder, a finished checkpoint URI or a HF model id
    (the one resolver training uses too: :func:`training.sft.resolve_model`)."""
    from training.sft import resolve_model

    return resolve_model(checkpoint_uri, cache_dir)


# --------------------------------------------------------------------------- hf


class HFBackend:
    """``transformers`` generate on a local (or downloaded) checkpoint; seeded sampling, CPU or GPU."""

    name = "hf"

    def __init__(
        self, model: str, protocol: SamplingProtocol, *, cache_dir: Path, precision: str = "auto", max_pixels: int = 262144,
        batch_size: int = 8,
    ) -> None:  # fmt: skip
        import torch

        from training.sft import is_vision_model, load_model_and_processors

        self.model_uri = model
        self.protocol = protocol
        self.batch_size = batch_size
        self.model_dir = resolve_checkpoint(model, cache_dir)
        cuda = torch.cuda.is_available()
        if precision in ("bf16", "fp16") and not cuda:
            raise ConfigError(f"precision {precision!r} needs a GPU; use 'fp32' or 'auto' on CPU")
        chosen = precision if precision != "auto" else ("bf16" if cuda else "fp32")
        self.dtype = chosen
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(chosen, torch.float32)
        self.model, self.tokenizer, self.image_processor = load_model_and_processors(
            self.model_dir, torch_dtype=dtype
        )
        self.model.eval()
        if cuda:
            self.model.to("cuda")
        # Stop on every end token the checkpoint declares (Qwen: <|im_end|> and <|endoftext|>),
        # not only the tokenizer's, and sample with the protocol alone (see the module docstring).
        ckpt = self.model.generation_config
        self.eos_ids = eos_token_ids(getattr(ckpt, "eos_token_id", None), self.tokenizer.eos_token_id)
        self.ignored_generation_config = {
            k: v for k in _SAMPLING_FIELDS if (v := getattr(ckpt, k, None)) is not None
        }
        self.model.generation_config = protocol_generation_config(
            protocol,
            eos_ids=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            bos_token_id=getattr(ckpt, "bos_token_id", None),
        )
        self.device = self.model.device
        self.supports_images = is_vision_model(self.model_dir)
        self.max_pixels = max_pixels
        self.image_token = "<|image_pad|>"
        self.template_opens_think = template_opens_think(self.tokenizer)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": self.model_uri,
            "dtype": self.dtype,
            "device": str(self.device),
            "sampling": self.sampling_settings(),
        }

    def sampling_settings(self) -> dict[str, Any]:
        """The generate settings in effect, and the checkpoint's sampling fields they replaced."""
        g = self.model.generation_config
        return {
            "do_sample": bool(g.do_sample),
            "temperature": g.temperature if g.do_sample else 0.0,
            "top_p": g.top_p if g.do_sample else None,
            "top_k": "off" if not g.top_k else g.top_k,
            "repetition_penalty": g.repetition_penalty,
            "eos_token_id": list(self.eos_ids),
            "ignored_checkpoint_generation_config": dict(self.ignored_generation_config),
        }

    def close(self) -> None:
        self.model = None

    def _prompt(self, row: Mapping[str, Any]) -> str:
        text = self.tokenizer.apply_chat_template(
            chat_messages(row, self.protocol.prompting), tokenize=False, add_generation_prompt=True
        )
        return text + THINK_PREFILL if self.protocol.prefill_think else text

    def generate(self, rows: list[dict[str, Any]], seeds: list[int]) -> list[list[Generation]]:
        out: list[list[Generation]] = [[] for _ in seeds]
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            prompts = [self._prompt(r) for r in chunk]
            for s, seed in enumerate(seeds):
                out[s].extend(self._generate_chunk(chunk, prompts, seed))
        return out

    def _generate_chunk(self, rows: list[dict[str, Any]], prompts: list[str], seed: int) -> list[Generation]:
        p = self.protocol
        opened = self.template_opens_think or p.prefill_think
        texts, tokens, finishes = self._run(rows, prompts, p.max_new_tokens, seed)
        gens = []
        forced_idx = []
        for i, (text, n, finish) in enumerate(zip(texts, tokens, finishes, strict=True)):
            full = (THINK_PREFILL + text) if opened and THINK_OPEN not in text[:32] else text
            gens.append(Generation(full, n, 0, finish))
            if p.force_end and finish == "length" and still_thinking(full):
                forced_idx.append(i)
        if forced_idx:
            # Continue each budget-exhausted reply from its own text + the cue, as one more batch.
            sub = [rows[i] for i in forced_idx]
            cont_prompts = [prompts[i] + texts[i] + FORCE_CUE for i in forced_idx]
            c_texts, c_tokens, _ = self._run(sub, cont_prompts, p.force_tokens, seed)
            for i, c_text, c_n in zip(forced_idx, c_texts, c_tokens, strict=True):
                g = gens[i]
                g.text = g.text + FORCE_CUE + c_text
                g.completion_tokens += c_n
                g.forced_end = True
                g.finish_reason = "forced"
        for i, g in enumerate(gens):
            if g.forced_end:
                # Every token of the first pass was reasoning: count it exactly, not by re-tokenizing.
                g.reasoning_tokens = tokens[i]
                continue
            span = reasoning_span(g.text)[0]
            g.reasoning_tokens = (
                len(self.tokenizer(span, add_special_tokens=False)["input_ids"]) if span else 0
            )
        return gens

    def _run(
        self, rows: list[dict[str, Any]], texts: list[str], max_new_tokens: int, seed: int
    ) -> tuple[list[str], list[int], list[str]]:
        import torch

        extra: dict[str, Any] = {}
        if any(r.get("images") for r in rows):
            if not self.supports_images:
                raise ConfigError(f"{self.model_uri} is a text-only model: it cannot answer image questions")
            texts, extra = self._with_images(rows, texts)
        self.tokenizer.padding_side = "left"  # generation continues from the right edge
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        if extra:
            # Qwen2.5-VL builds its 3-D (mrope) image positions only when told which tokens are
            # image tokens; without this it silently falls back to 1-D positions for the image.
            image_token_id = getattr(self.model.config, "image_token_id", None)
            extra["mm_token_type_ids"] = (enc["input_ids"] == image_token_id).to(torch.int32)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        extra = {k: v.to(self.device) for k, v in extra.items()}
        torch.manual_seed(seed)  # one seed per (batch, protocol seed): reruns sample the same replies
        with torch.inference_mode():
            # Sampling, eos and pad come from the protocol's generation_config set in __init__.
            out = self.model.generate(**enc, **extra, max_new_tokens=max_new_tokens)
        new = out[:, enc["input_ids"].shape[1] :]
        result_texts, counts, finishes = [], [], []
        for ids in new.tolist():
            kept, finish = cut_at_stop(ids, self.eos_ids, self.tokenizer.pad_token_id)
            result_texts.append(self.tokenizer.decode(kept, skip_special_tokens=True))
            counts.append(len(kept))
            finishes.append(finish)
        return result_texts, counts, finishes

    def _with_images(self, rows: list[dict[str, Any]], texts: list[str]) -> tuple[list[str], dict[str, Any]]:
        import io

        import torch
        from PIL import Image

        from training.data import _fit_pixels

        pil = []
        for r in rows:
            for im in r.get("images") or []:
                with Image.open(io.BytesIO(storage.read_bytes(im["uri"]))) as img:
                    pil.append(_fit_pixels(img.convert("RGB"), self.max_pixels))
        out = self.image_processor(images=pil, return_tensors="pt")
        merge = getattr(self.image_processor, "merge_size", 2) or 2
        counts = iter(int(g.prod()) // (merge * merge) for g in out["image_grid_thw"])
        expanded = []
        for text in texts:
            pieces = text.split(self.image_token)
            rebuilt = pieces[0]
            for piece in pieces[1:]:
                rebuilt += self.image_token * next(counts) + piece
            expanded.append(rebuilt)
        return expanded, {
            "pixel_values": out["pixel_values"],
            "image_grid_thw": torch.as_tensor(out["image_grid_thw"]),
        }


def reasoning_span(response: str) -> tuple[str, bool]:
    """The text inside the first ``<think>...</think>`` (to the end if never closed), and whether it closed.

    A response without ``<think>`` has no reasoning span (empty, closed). A forced reply counts
    as closed only by the cue, which is not reasoning: the span stops at ``</think>``.
    """
    low = response.lower()
    start = low.find(THINK_OPEN)
    if start < 0:
        return "", True
    end = low.find(THINK_CLOSE, start)
    body = response[start + len(THINK_OPEN) : end if end >= 0 else len(response)]
    return body, end >= 0


def eos_token_ids(*sources: Any) -> list[int]:
    """Every end token id named by ``sources`` (ints, lists of ints or None), first occurrence order."""
    out: list[int] = []
    for src in sources:
        for t in src if isinstance(src, (list, tuple)) else [src]:
            if t is not None and int(t) not in out:
                out.append(int(t))
    return out


def cut_at_stop(ids: list[int], eos_ids: list[int], pad_token_id: int | None) -> tuple[list[int], str]:
    """Generated ids up to the first end token (any of ``eos_ids``) and ``stop``, else all and ``length``."""
    stops = set(eos_ids)
    for i, t in enumerate(ids):
        if t in stops:
            return [x for x in ids[:i] if x != pad_token_id], "stop"
    return [x for x in ids if x != pad_token_id], "length"


def protocol_generation_config(
    protocol: SamplingProtocol, *, eos_ids: list[int], pad_token_id: int | None, bos_token_id: int | None
) -> Any:
    """A fresh ``GenerationConfig`` from the protocol alone: top-k off, no repetition penalty.

    transformers fills every field left unset from the model's own generation_config and then
    from its global defaults (``top_k=50``), so the neutral values are set explicitly.
    """
    from transformers import GenerationConfig

    sampling: dict[str, Any] = {"do_sample": False}
    if protocol.temperature > 0:
        sampling = {"do_sample": True, "temperature": protocol.temperature, "top_p": protocol.top_p}
    return GenerationConfig(
        **sampling,
        top_k=0,  # 0 = no top-k filter (transformers adds TopK only for top_k not in (None, 0))
        repetition_penalty=1.0,
        num_beams=1,
        eos_token_id=list(eos_ids),
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
    )


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
        from octomed_data.inference.ratelimit import LocalRateLimiter
        from octomed_data.teachers import TeacherConfig

        self.url = url.rstrip("/")
        self.protocol = protocol
        self.max_attempts = max_attempts
        self.sampling_extras = sampling_extras
        # The chat template opens the thought in the prompt: replies start inside it.
        self.opens_think = opens_think
        self.api_key_env = api_key_env
        key = os.environ.get(api_key_env)
        if not key:
            # vLLM/SGLang servers started without --api-key accept any key; hosted APIs answer 401.
            log.info("no API key in $%s: sending a placeholder (fine for local vLLM/SGLang)", api_key_env)
            key = "EMPTY"
        self._key = SecretStr(key)
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
        self.limiter = LocalRateLimiter.for_teachers([self.teacher])
        self.client = self._loop.run_until_complete(self._open(EndpointClient))

    async def _open(self, cls: Any) -> Any:
        return cls(self.teacher, self._key, self.server_kind)  # its semaphore belongs to this backend's loop

    def _first_model(self) -> str:
        """The served model (GET /models); also the up-front reachability check."""
        import openai

        from octomed_data.inference.client import scrub

        async def probe() -> Any:
            client = openai.AsyncOpenAI(
                api_key=self._key.get_secret_value(), base_url=self.url, max_retries=1, timeout=15.0
            )
            try:
                return await client.models.list()
            finally:
                await client.close()

        try:
            models = self._loop.run_until_complete(probe())
        except Exception as exc:
            msg = scrub(
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__, [self._key.get_secret_value()]
            )
            raise EndpointUnreachable(
                f"cannot list models at {self.url} ({type(exc).__name__}: {msg}); is the server up? "
                "(or pass --served-model-name)"
            ) from None
        ids = [m.id for m in getattr(models, "data", [])]
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
        self._loop.run_until_complete(self.client.close())
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
        from octomed_data.inference.client import request_with_retries
        from octomed_data.inference.retry import Backoff

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
        async with self.client.slots:
            response, _, _, error = await request_with_retries(
                self.client,
                kwargs,
                max_attempts=self.max_attempts,
                backoff=Backoff(base_s=0.5, max_s=30.0),
                limiter=self.limiter,
                estimate=chars // 4 + max_tokens,
            )
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
        text, finish, tokens, reasoning_tokens = _reply(response, THINK_PREFILL if opened else "")
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
                c_text, c_tokens = _continuation_text(cont)
                gen.text = prefix + c_text
                gen.completion_tokens += c_tokens
        return gen


def _continuation_text(response: Any) -> tuple[str, int]:
    """A forced continuation's new text, raw: reasoning field and content joined as generated.

    Raw because a reasoning parser (vLLM deepseek_r1) calls any output without ``</think>``
    reasoning, so the forced answer ``B}`` may come back in the reasoning field.
    """
    msg = response.choices[0].message
    usage = getattr(response, "usage", None)
    text = (reasoning_field(msg) or "") + (msg.content or "")
    return text, int(getattr(usage, "completion_tokens", 0) or 0)


def _reply(response: Any, prefill: str) -> tuple[str, str, int, int]:
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


# --------------------------------------------------------------------------- vllm


class VLLMBackend:
    """The checkpoint behind a vLLM OpenAI server of its own (own venv), evaluated over HTTP.

    The server is started here from :func:`octomed_data.inference.vllm_service.ensure_venv`'s
    interpreter (``OCTOMED_VLLM_PYTHON`` for a ready one) and stopped by :meth:`close`. Requests go
    through :class:`OpenAIBackend` (same protocol, seeds, forced end) with ``concurrency`` in
    flight, so vLLM's scheduler batches them as the offline engine would. No reasoning parser:
    the raw reply is scored, as with ``hf``.
    """

    name = "vllm"
    supports_images = True

    def __init__(
        self,
        model: str,
        protocol: SamplingProtocol,
        *,
        cache_dir: Path,
        concurrency: int = 256,
        max_model_len: int | None = None,
        python: str | None = None,
        extra_args: tuple[str, ...] = (),
        timeout_s: float = 600.0,
        start_timeout_s: float = 900.0,
    ) -> None:
        from octomed_data.inference.vllm_service import VLLMServer, ensure_venv

        self.protocol = protocol
        self.model_uri = model
        self.model_dir = resolve_checkpoint(model, cache_dir)
        opens_think = False
        try:
            from transformers import AutoTokenizer

            opens_think = template_opens_think(AutoTokenizer.from_pretrained(str(self.model_dir)))
        except Exception as exc:  # no chat template: the server will say so on the first request
            log.info("cannot read the chat template of %s: %s", self.model_dir, exc)
        need = protocol.max_new_tokens + protocol.force_tokens + 2048  # reply + forced answer + prompt
        self.server = VLLMServer(
            self.model_dir,
            python=python or ensure_venv(log=log.info),
            served_model_name="octomed-eval",
            max_model_len=max_model_len or need,
            reasoning_parser=None,
            extra_args=extra_args,
        ).start(start_timeout_s)
        try:
            self.client = OpenAIBackend(
                self.server.base_url,
                protocol,
                served_model_name="octomed-eval",
                concurrency=concurrency,
                timeout_s=timeout_s,
                server="vllm",
                opens_think=opens_think,
            )
        except BaseException:
            self.server.stop()
            raise

    def describe(self) -> dict[str, Any]:
        inner = self.client.describe()
        return {
            "backend": self.name,
            "model": self.model_uri,
            "server": {
                "kind": "vllm",
                "python": self.server.python,
                "max_model_len": self.server.max_model_len,
            },
            "concurrency": inner["concurrency"],
            "sampling": inner["sampling"],
        }

    def generate(self, rows: list[dict[str, Any]], seeds: list[int]) -> list[list[Generation]]:
        return self.client.generate(rows, seeds)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.server.stop()
