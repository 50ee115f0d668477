"""Ctrl-C, honoured everywhere with exit 130.

Python delivers Ctrl-C as a KeyboardInterrupt raised wherever the main thread happens to
be. Where that is a garbage-collection callback (XLA registers one), Python prints
"Exception ignored" and carries on, so a plain Ctrl-C can be lost and the command runs to
completion. Here every Ctrl-C is also remembered: `check()`, called at the pipeline's safe
points (between units, artifacts, images), raises a remembered one, and the CLI checks
once more when a command returns.

- `watched(defer=False)`: the first Ctrl-C interrupts at once (and is remembered).
- `watched(defer=True)` (the build): the first Ctrl-C is a request honoured at the next
  `check()`, so the unit being compiled finishes and is cached; a second one interrupts
  at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_requested = [False]


def requested() -> bool:
    return _requested[0]


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed and not acted on yet."""
    if _requested[0]:
        raise KeyboardInterrupt


@contextlib.contextmanager
def watched(defer: bool = False) -> Iterator[None]:
    """Install the handler for the block (main thread only; elsewhere signals never arrive)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        first = not _requested[0]
        _requested[0] = True
        if not (defer and first):
            signal.default_int_handler(signum, frame)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def reset() -> None:
    """Forget a Ctrl-C that was acted on (a new command in the same process starts clean)."""
    _requested[0] = False
