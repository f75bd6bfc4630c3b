"""YAML alias bombs are refused where the factory reads YAML (recipes, sources files, configs)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from octomed_data.config import read_yaml, safe_load_capped
from octomed_data.errors import ConfigError
from octomed_data.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The classic "billion laughs": each level lists the previous one ``width`` times."""
    lines = ["name: bomb", f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_in_a_recipe_is_one_line_naming_the_file_and_fast(tmp_path: Path) -> None:
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(alias_bomb())
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"recipe .*bomb\.yaml: YAML anchors/aliases expand to more than"):
        load_recipe(str(recipe))
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(ConfigError, match="bomb.yaml"):
        read_yaml(recipe, "teachers config")


def test_a_recursive_anchor_is_refused() -> None:
    with pytest.raises(ConfigError, match="refers to itself"):
        safe_load_capped("a: &a [1, *a]\n", "x.yaml")


def test_ordinary_yaml_with_anchors_and_merge_keys_loads_as_safe_load_does() -> None:
    text = (
        "defaults: &d {temperature: 0.6, top_p: 0.95}\n"
        "teachers:\n  - {<<: *d, name: r1}\n  - {<<: *d, name: gpt, temperature: 0.2}\nlist: &l [1, 2]\nagain: *l\n"
    )
    assert safe_load_capped(text, "t") == yaml.safe_load(text)
    assert safe_load_capped("", "t") is None
    with pytest.raises(yaml.YAMLError):
        safe_load_capped("a: [1, 2\n", "t")


def test_every_bundled_yaml_loads_exactly_as_before() -> None:
    files = sorted((REPO / "octomed_data").rglob("*.yaml")) + sorted(
        (REPO / "training" / "configs").glob("*.yaml")
    )
    assert len(files) >= 5
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert safe_load_capped(text, str(path)) == yaml.safe_load(text), path


def test_the_cap_is_a_cap_not_a_ban() -> None:
    small = alias_bomb(levels=3, width=9)  # 1 + 9 + 81 + 729 expanded nodes: fine
    assert safe_load_capped(small, "t")["a2"][0][0][0] == "lol"
    with pytest.raises(ConfigError):
        safe_load_capped(small, "t", max_nodes=500)
