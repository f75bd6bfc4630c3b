"""Server kinds: what each OpenAI-compatible server accepts, so that no request is rejected.

"OpenAI-compatible" servers differ in what they take beyond the OpenAI API. The evaluation
protocol wants sampling from temperature/top-p alone (never a checkpoint's ``top_k`` or
repetition penalty), and distillation wants ``n`` samples per request where the server honours
it. How that is spelled, and whether it may be sent at all, depends on the server:

| kind     | top-k off    | repetition penalty off     | honours ``n`` | per-request seed |
|----------|--------------|----------------------------|---------------|------------------|
| openai   | not sent     | not sent                   | yes           | yes              |
| deepseek | not sent     | not sent                   | no            | yes              |
| vllm     | ``top_k=-1`` | ``repetition_penalty=1.0`` | yes           | yes              |
| sglang   | ``top_k=-1`` | ``repetition_penalty=1.0`` | yes           | yes              |
| llamacpp | ``top_k=0``  | ``repeat_penalty=1.0``     | no            | yes              |
| generic  | not sent     | not sent                   | no            | yes              |

A teacher or endpoint names its kind (``server:``), or ``auto`` detects it once: known hosts
(api.openai.com, api.deepseek.com), then what a server says about itself (vLLM's ``/version``,
SGLang's ``/get_server_info``, llama.cpp's ``/props``, llama-cpp-python's ``owned_by: "me"``,
the sandbox's fingerprint). An unknown server is ``generic``: only OpenAI API fields are sent.
"""

from __future__ import annotations

import enum
import json
import logging
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger("octomed_data.inference")


class ServerKind(enum.StrEnum):
    OPENAI = "openai"
    DEEPSEEK = "deepseek"
    VLLM = "vllm"
    SGLANG = "sglang"
    LLAMACPP = "llamacpp"
    GENERIC = "generic"


@dataclass(frozen=True)
class ServerProfile:
    """What a server kind accepts."""

    kind: ServerKind
    neutral_sampling: dict[str, Any] = field(default_factory=dict)  # "top-k off, no penalty" spelled its way
    honours_n: bool = False
    accepts_seed: bool = True


_PROFILES = {
    ServerKind.OPENAI: ServerProfile(ServerKind.OPENAI, {}, honours_n=True),
    ServerKind.DEEPSEEK: ServerProfile(ServerKind.DEEPSEEK, {}, honours_n=False),
    ServerKind.VLLM: ServerProfile(ServerKind.VLLM, {"top_k": -1, "repetition_penalty": 1.0}, honours_n=True),
    ServerKind.SGLANG: ServerProfile(
        ServerKind.SGLANG, {"top_k": -1, "repetition_penalty": 1.0}, honours_n=True
    ),
    # llama.cpp validates top_k >= 0 (HTTP 500 on -1); 0 disables it. It ignores n.
    ServerKind.LLAMACPP: ServerProfile(ServerKind.LLAMACPP, {"top_k": 0, "repeat_penalty": 1.0}),
    ServerKind.GENERIC: ServerProfile(ServerKind.GENERIC, {}),
}

_HOSTS = {
    "api.openai.com": ServerKind.OPENAI,
    ".openai.azure.com": ServerKind.OPENAI,
    "api.deepseek.com": ServerKind.DEEPSEEK,
}
_detected: dict[str, ServerKind] = {}
_lock = threading.Lock()


def profile(kind: ServerKind | str) -> ServerProfile:
    return _PROFILES[ServerKind(kind)]


def _host_kind(base_url: str) -> ServerKind | None:
    host = (urlparse(base_url).hostname or "").lower()
    for h, kind in _HOSTS.items():
        if host == h or (h.startswith(".") and host.endswith(h)):
            return kind
    return None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect is "no such endpoint", never followed


_OPENER = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))


class _Unreachable(Exception):
    pass


def _get_json(url: str, key: str | None, timeout: float) -> Any | None:
    """The JSON at ``url``, None for any answer that is not a 200 JSON body; unreachable raises."""
    request = urllib.request.Request(url)
    if key:
        # Never forwarded on a redirect (urllib copies ordinary headers to any origin).
        request.add_unredirected_header("Authorization", f"Bearer {key}")
    try:
        with _OPENER.open(request, timeout=timeout) as r:
            if r.status != 200:
                return None
            return json.loads(r.read(1 << 20) or b"null")
    except urllib.error.HTTPError:
        return None  # the server answered: it just has no such endpoint
    except (urllib.error.URLError, OSError) as exc:
        raise _Unreachable(str(exc)) from None
    except ValueError:
        return None


def list_models(base_url: str, key: str | None = None, timeout: float = 15.0) -> list[str]:
    """The ids ``GET /models`` lists (the up-front reachability check of a served model); raises
    ConnectionError when the server cannot be reached or answers no model list."""
    try:
        models = _get_json(f"{base_url.rstrip('/')}/models", key, timeout)
    except _Unreachable as exc:
        raise ConnectionError(str(exc)) from None
    if not isinstance(models, dict):
        raise ConnectionError("no model list (GET /models)")
    return [str(m.get("id")) for m in models.get("data") or [] if isinstance(m, dict) and m.get("id")]


def _root(base_url: str) -> str:
    u = base_url.rstrip("/")
    return u[: -len("/v1")] if u.endswith("/v1") else u


def probe_kind(base_url: str, key: str | None = None, timeout: float = 5.0) -> ServerKind | None:
    """Ask the server what it is (no cache; see :func:`detect_kind`); None when it cannot be reached."""
    known = _host_kind(base_url)
    if known is not None:
        return known
    try:
        return _probe(base_url, key, timeout)
    except _Unreachable:
        return None


def _probe(base_url: str, key: str | None, timeout: float) -> ServerKind:
    root = _root(base_url)
    version = _get_json(f"{root}/version", key, timeout)
    if isinstance(version, dict) and "version" in version:
        return ServerKind.VLLM
    for path in ("/get_server_info", "/server_info"):
        info = _get_json(f"{root}{path}", key, timeout)
        if isinstance(info, dict) and any(k in info for k in ("tp_size", "model_path", "served_model_name")):
            return ServerKind.SGLANG
    props = _get_json(f"{root}/props", key, timeout)
    if isinstance(props, dict) and ("default_generation_settings" in props or "n_ctx" in props):
        return ServerKind.LLAMACPP
    models = _get_json(f"{base_url.rstrip('/')}/models", key, timeout)
    data = models.get("data") if isinstance(models, dict) else None
    owners = {str(m.get("owned_by")) for m in data or [] if isinstance(m, dict)}
    if owners == {"me"}:  # llama-cpp-python's server
        return ServerKind.LLAMACPP
    if "vllm" in owners:
        return ServerKind.VLLM
    if "sglang" in owners:
        return ServerKind.SGLANG
    return ServerKind.GENERIC


def detect_kind(base_url: str, key: str | None = None, configured: str = "auto") -> ServerKind:
    """The server kind: ``configured`` unless ``auto``, else probed once per URL and process."""
    if configured != "auto":
        return ServerKind(configured)
    url = base_url.rstrip("/")
    with _lock:
        if url in _detected:
            return _detected[url]
    kind = probe_kind(url, key)
    if kind is None:
        # Not reachable now: send only OpenAI API fields, and ask again next time.
        log.info("server at %s not reachable for detection: treated as generic", url)
        return ServerKind.GENERIC
    with _lock:
        _detected[url] = kind
    log.info("server at %s detected as %s", url, kind.value)
    return kind


def forget(base_url: str | None = None) -> None:
    """Drop cached detections (a server restarted as another kind, or tests)."""
    with _lock:
        if base_url is None:
            _detected.clear()
        else:
            _detected.pop(base_url.rstrip("/"), None)
