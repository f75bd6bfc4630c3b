"""Generation backends for evaluation behind one small interface (:class:`~evaluation.backends.base.Backend`):
``hf`` (:mod:`evaluation.backends.hf`), ``openai`` (:mod:`evaluation.backends.openai`) and ``vllm``
(:mod:`evaluation.backends.vllm`). The shared protocol, reply record and ``<think>`` helpers are in
:mod:`evaluation.backends.base`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evaluation.backends.base import (
    FORCE_CUE,
    Backend,
    EndpointUnreachable,
    Generation,
    SamplingProtocol,
    chat_messages,
    reasoning_span,
    still_thinking,
)
from octomed_data.errors import ConfigError

__all__ = [
    "FORCE_CUE",
    "Backend",
    "EndpointUnreachable",
    "Generation",
    "SamplingProtocol",
    "auto_backend",
    "chat_messages",
    "make_backend",
    "reasoning_span",
    "still_thinking",
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
        from evaluation.backends.hf import HFBackend

        return HFBackend(model, protocol, cache_dir=cache_dir, **options.get("hf", {}))
    if kind == "openai":
        from evaluation.backends.openai import OpenAIBackend

        return OpenAIBackend(model, protocol, **options.get("openai", {}))
    if kind == "vllm":
        from evaluation.backends.vllm import VLLMBackend

        return VLLMBackend(model, protocol, cache_dir=cache_dir, **options.get("vllm", {}))
    raise ConfigError(f"unknown backend {kind!r}; expected hf, openai or vllm")
