"""Tools that cannot share the project's pins (vLLM, LLaMA-Factory) get a venv of their own.

:func:`cached_venv` builds one under ``cache_root()/<name>`` once: ``pip install`` of each step in
order, then removal of packages that break it (the registry's CUDA torchvision/torchaudio on CPU
machines). Builds are serialised by a file lock (two test processes never build the same venv at
once) and a finished build is marked, so a half-built venv is rebuilt rather than used.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from octomed_data.errors import ConfigError

READY = ".octomed-ready"


class VenvBuildError(ConfigError):
    """A tool's own venv could not be built (one line saying which step failed and why)."""


def cache_root() -> Path:
    return Path(os.environ.get("OCTOMED_CACHE", Path.home() / ".cache" / "octomed-data"))


def last_line(text: str) -> str:
    """The last meaningful line of pip's output (the index's location warnings are noise here)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
    return lines[-1][:300] if lines else "(no output)"


def cached_venv(
    name: str,
    installs: Sequence[Sequence[str]],
    *,
    remove: Sequence[str] = (),
    verify: Callable[[str], bool] | None = None,
    rebuild: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[str, float]:
    """``(python, seconds spent building)`` of the venv ``name``; 0 seconds when it was ready.

    ``installs``: the requirements of each ``pip install`` step, in order (torch first where a
    later package would otherwise pull a CUDA build). ``verify(python)`` must hold after the build.
    """
    venv = cache_root() / name
    python = str(venv / "bin" / "python")
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(str(venv) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not rebuild and (venv / READY).is_file() and Path(python).is_file():
            return python, 0.0
        log(f"building {venv} (once, a few minutes) ...")
        started = time.monotonic()
        if venv.exists():
            shutil.rmtree(venv)
        steps = [(f"python -m venv {venv}", [sys.executable, "-m", "venv", str(venv)])]
        pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        steps += [(f"pip install {' '.join(reqs)}", [*pip, *reqs]) for reqs in installs]
        for step, cmd in steps:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise VenvBuildError(f"cannot build {venv}: {step} failed: {last_line(r.stderr or r.stdout)}")
        if remove:  # absent packages are fine: pip only warns
            subprocess.run([python, "-m", "pip", "uninstall", "-y", "-q", *remove], capture_output=True)
        if verify is not None and not verify(python):
            raise VenvBuildError(f"{venv} was built but does not work (check of {name} failed)")
        seconds = round(time.monotonic() - started, 1)
        freeze = subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
        record = {"installs": [list(r) for r in installs], "seconds": seconds, "freeze": freeze.splitlines()}
        (venv / READY).write_text(json.dumps(record))
        log(f"{venv} ready in {seconds:.0f} s")
    return python, seconds
