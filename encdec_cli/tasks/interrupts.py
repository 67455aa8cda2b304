"""Ctrl-C (SIGINT) that never cuts a write in half.

A job installs an :class:`InterruptGuard` for its run and wraps each output write in
:meth:`InterruptGuard.protect`. A Ctrl-C outside a protected block raises ``KeyboardInterrupt`` at
once (the engine step or input read it stops loses nothing); inside one it is held until the
block ends, so the part file or manifest line being committed is finished first. After
:meth:`InterruptGuard.stopping`, further Ctrl-Cs are only noted: the job is already saving
what it has and exiting with status 130.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class InterruptGuard:
    """SIGINT handling for one job (see the module docstring)."""

    def __init__(self) -> None:
        self._depth = 0  # nesting of protect() blocks
        self._pending = False  # a Ctrl-C arrived inside a protected block
        self._stopping = False
        self.count = 0  # Ctrl-Cs received

    def _handler(self, signum, frame) -> None:
        self.count += 1
        if self._depth or self._stopping:
            self._pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[InterruptGuard]:
        """Route SIGINT through this guard for the block (only from the main thread; elsewhere the
        default behaviour stays)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    @contextlib.contextmanager
    def protect(self) -> Iterator[None]:
        """A block that a Ctrl-C does not interrupt; a Ctrl-C received inside it is raised as
        ``KeyboardInterrupt`` when the block ends."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if not self._depth and self._pending and not self._stopping:  # (not when the block raised)
            self._pending = False
            raise KeyboardInterrupt

    def stopping(self) -> None:
        """The job is shutting down: from now on Ctrl-C is only noted, not raised."""
        self._stopping = True
