"""The one config loader: YAML files and mappings into typed models, or one ``ConfigError`` line.

Every typed config (the recipe, teachers, mixture, training and evaluation jobs) is validated
here, so a bad setting always reads the same way: where, which field, what is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from octomed_data.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def _problem(e: Any) -> str:
    msg = str(e["msg"]).removeprefix("Value error, ")
    return f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {msg}"


def first_error(exc: ValidationError) -> str:
    """``field.path: message`` of pydantic's first problem."""
    return _problem(exc.errors()[0])


def all_errors(exc: ValidationError) -> str:
    """Every problem, ``; ``-separated, on one line."""
    return "; ".join(_problem(e) for e in exc.errors())


def validate_config(cls: type[M], data: Any, where: str = "config") -> M:
    """Build ``cls`` from a mapping, turning pydantic's report into one clear line."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid {cls.__name__} in {where}: {all_errors(exc)}") from None


MAX_YAML_NODES = 100_000  # nodes once every alias is expanded: a real recipe has a few hundred


def safe_load_capped(text: str, where: str, max_nodes: int = MAX_YAML_NODES) -> Any:
    """``yaml.safe_load`` that refuses alias bombs ("billion laughs"): the document's size with every
    alias expanded must stay at most ``max_nodes``; an alias inside its own anchor is refused too.
    Syntax errors still raise ``yaml.YAMLError``."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        sizes: dict[int, int] = {}

        def size(n: yaml.Node, open_: set[int]) -> int:
            key = id(n)
            if key in sizes:
                return sizes[key]
            if key in open_:
                raise ConfigError(f"{where}: a YAML alias refers to itself (recursive anchor); refused")
            open_.add(key)
            total = 1
            children: list[yaml.Node] = []
            if isinstance(n, yaml.SequenceNode):
                children = list(n.value)
            elif isinstance(n, yaml.MappingNode):
                children = [x for pair in n.value for x in pair]
            for child in children:
                total += size(child, open_)
                if total > max_nodes:
                    break
            open_.discard(key)
            sizes[key] = total
            return total

        if size(node, set()) > max_nodes:
            raise ConfigError(
                f"{where}: YAML anchors/aliases expand to more than {max_nodes} nodes (an alias bomb?); refused"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML mapping from a local path or URI; unreadable, invalid or non-mapping files are one line."""
    from octomed_data import storage

    try:
        text = storage.read_bytes(str(path)).decode("utf-8")
    except Exception as exc:  # StorageError already names the path
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    try:
        data = safe_load_capped(text, f"{what} {path}") or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a mapping of settings")
    return data


def load_yaml_config(path: str | Path, cls: type[M], overrides: dict[str, Any] | None = None) -> M:
    """Load ``cls`` from a YAML file (local path or URI); invalid files raise :class:`ConfigError`."""
    data = read_yaml(path)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return validate_config(cls, data, str(path))
