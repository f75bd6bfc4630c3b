"""Fixtures for the compose-stack tests: the files as text, and compose's interpolation of them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.compose import ROOT, interpolate, read_env_example


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
