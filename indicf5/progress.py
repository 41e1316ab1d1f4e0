"""Where a long computation is at ("length 250 (2 of 2): loop, repeat 3 of 3"), for whoever listens:
the build shows it on its progress artifact; without a listener a report costs nothing."""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, Iterator

_listener: ContextVar[Callable[[str], None] | None] = ContextVar("indicf5_progress", default=None)


def report(what: str) -> None:
    if (listener := _listener.get()) is not None:
        listener(what)


@contextlib.contextmanager
def listening(listener: Callable[[str], None]) -> Iterator[None]:
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)
