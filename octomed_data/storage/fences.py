"""Write fences: a shard's writer runs inside ``fenced(check)``; before each data write that could
publish something (a journal segment, a shard's file and marker) ``check_fence(uri)`` calls
``check``, which raises when the writer no longer holds the shard's lease (another job took it over).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

_FENCE: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "octomed_write_fence", default=None
)


@contextlib.contextmanager
def fenced(check: Callable[[str], None]) -> Iterator[None]:
    """Writes made in this context (and tasks/threads started from it) call ``check(uri)`` first."""
    token = _FENCE.set(check)
    try:
        yield
    finally:
        _FENCE.reset(token)


def in_fence() -> bool:
    """Whether this context writes under a fence (a shard's lease holder)."""
    return _FENCE.get() is not None


def check_fence(uri: str) -> None:
    """Raise if this context's writer has lost its right to write (no-op outside a fence)."""
    check = _FENCE.get()
    if check is not None:
        check(uri)
