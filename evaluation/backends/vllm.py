"""The ``vllm`` backend: the checkpoint served by a vLLM OpenAI server started from vLLM's own
environment (:mod:`octomed_data.inference.vllm_service`; vLLM's pins exclude this project's, so it
never shares its venv), then the ``openai`` path against it with enough requests in flight that the
server batches them as offline ``vllm.LLM`` would. Works on a GPU and, with the CPU build, here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from evaluation.backends.base import Generation, SamplingProtocol, resolve_checkpoint, template_opens_think
from evaluation.backends.openai import OpenAIBackend

log = logging.getLogger(__name__)


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
