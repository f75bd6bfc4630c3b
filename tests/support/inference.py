"""Recorded real server bodies (``tests/fixtures/servers``)."""

from __future__ import annotations

import json
from pathlib import Path

FIXTURES = Path(__file__).parents[1] / "fixtures" / "servers"


def recorded(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())
