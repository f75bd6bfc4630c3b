"""Own venvs for tools that cannot share the project's pins: built once, marked, failures in one line."""

from __future__ import annotations

import pytest

from octomed_data.venvs import READY, VenvBuildError, cache_root, cached_venv


def test_cached_venv_builds_once_and_fails_in_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OCTOMED_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    python, seconds = cached_venv(
        "tool", [["six==1.16.0"]], remove=("not-installed-pkg",), log=lambda m: None
    )
    assert seconds > 0 and (tmp_path / "tool" / READY).is_file() and python.startswith(str(tmp_path))
    assert cached_venv("tool", [["six==1.16.0"]], log=lambda m: None) == (python, 0.0)  # reused
    with pytest.raises(VenvBuildError) as exc:
        cached_venv("broken", [["octomed-no-such-package-xyz==0.0.1"]], log=lambda m: None)
    assert "\n" not in str(exc.value) and "pip install octomed-no-such-package-xyz==0.0.1 failed" in str(
        exc.value
    )
    assert not (tmp_path / "broken" / READY).exists()
    with pytest.raises(VenvBuildError, match="does not work"):
        cached_venv("unverified", [["six==1.16.0"]], verify=lambda py: False, log=lambda m: None)
