"""Fixtures of the decontamination tests: the index from the bundled registry pack, MedQA's test set."""

from __future__ import annotations

import pytest

from octomed_data.decontam import DecontamIndex
from tests.support.decontam_rows import read_jsonl


@pytest.fixture(scope="session")
def index() -> DecontamIndex:
    """The index ``octomed-data decontaminate`` builds by default (read-only in every test)."""
    return DecontamIndex.from_registry()


@pytest.fixture(scope="session")
def medqa(shared_data) -> list[dict]:
    return read_jsonl(shared_data / "medqa" / "phrases_no_exclude_test.jsonl")
