"""Fixtures for the compose-stack tests: the files as text, and compose's interpolation of them."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[?-])([^}]*))?\}")


def read_env_example() -> dict[str, str]:
    out = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def interpolate(text: str, env: dict[str, str]) -> str:
    """``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$`` as docker compose reads them."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name, "")
        if op in (":?", "?") and not value:
            raise ValueError(f"{name}: {arg}")
        if op in (":-", "-") and not value:
            return arg
        return value

    return VAR.sub(sub, text).replace("$$", "$")


@pytest.fixture(scope="session")
def deploy_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def env_example() -> dict[str, str]:
    return read_env_example()


@pytest.fixture(scope="session")
def compose_text() -> str:
    return (ROOT / "docker-compose.yml").read_text()


@pytest.fixture(scope="session")
def filled_env(env_example) -> dict[str, str]:
    """.env.example with a distinct, recognisable value for every empty (secret or required) entry."""
    return {k: v or f"sentinel-{k.lower().replace('_', '-')}" for k, v in env_example.items()}


@pytest.fixture(scope="session")
def render(compose_text, filled_env) -> Callable[..., dict[str, Any]]:
    """``render(text=None, **env)``: the compose file (or a mutated copy) as compose resolves it."""

    def _render(text: str | None = None, **overrides: str) -> dict[str, Any]:
        return yaml.safe_load(
            interpolate(compose_text if text is None else text, {**filled_env, **overrides})
        )

    return _render
