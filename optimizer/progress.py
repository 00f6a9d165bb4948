"""Progress of long steps, for whoever shows it: the CLI's status line, or a caller's callback.

The core reports what it is doing -- the pass running, the validation run, bytes written --
through :func:`report`; nothing is shown unless a listener is installed with :func:`listening`
(the CLI installs one when stderr is a terminal). A context variable carries the listener, so
concurrent runs in threads or tasks each report to their own.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

#: ``listener(step, done, total)``: ``step`` says what runs ("pass cse (round 2)", "validation:
#: running the reference model"); ``done`` and ``total`` count its bytes when it moves data
#: (writing a data file), else None.
Listener = Callable[[str, "int | None", "int | None"], None]

_LISTENER: contextvars.ContextVar[Listener | None] = contextvars.ContextVar(
    "onnxopt_progress", default=None)


@contextlib.contextmanager
def listening(listener: Listener | None) -> Iterator[None]:
    """Within the block, :func:`report` calls ``listener`` (None: nothing)."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)


def report(step: str, done: int | None = None, total: int | None = None) -> None:
    """Tell the listener, if any, that ``step`` runs (``done`` of ``total`` bytes so far)."""
    listener = _LISTENER.get()
    if listener is not None:
        listener(step, done, total)
