"""Ctrl-C (SIGINT) and SIGTERM stop a job in order, never cutting a write in half.

:func:`install` (called first thing by the ``encdec`` entry point) makes SIGTERM, as batch
schedulers (Slurm, Kubernetes) send it, raise ``KeyboardInterrupt`` just as Ctrl-C does, and notes
which signal came: the exit status is 130 after Ctrl-C and 143 after SIGTERM (:func:`exit_status`).

A job installs an :class:`InterruptGuard` for its run and wraps each output write in
:meth:`InterruptGuard.protect`. A stop signal outside a protected block raises ``KeyboardInterrupt``
at once (the engine step or input read it stops loses nothing); inside one it is held until the
block ends, so the part file or manifest line being committed is finished first. After
:meth:`InterruptGuard.stopping`, further signals are only noted: the job is already saving what it
has, printing its summary and exiting.

A stop signal that arrives while a module imports is held until no import runs any more (checked
every 20 ms on SIGALRM, whose handler is put back after), then acted on: an import runs native
extensions' initialisation (torch's, triton's), and a ``KeyboardInterrupt`` raised in Python code
such an extension calls back ends the process (pybind11 aborts: "terminate called after throwing an
instance of error_already_set").
A second stop signal while one is held acts at once: whoever sends two wants out now.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # signal -> exit status (128 + its number)
_received: list[int] = []  # stop signals this process received, in order


def _note(signum: int, frame=None) -> None:
    _received.append(signum)


def _raise(signum, frame) -> None:
    _note(signum)
    if not _held_while_importing(signum, frame, _interrupt):
        raise KeyboardInterrupt


def _interrupt() -> None:
    raise KeyboardInterrupt


_IMPORT_CHECK_S = 0.02
# a stop signal held while an import runs: (the signal, what acts on it, the SIGALRM handler before)
_held: tuple[int, Callable[[], None], object] | None = None


def _importing(frame) -> bool:
    """Whether ``frame`` runs inside an import (the import system's frames are on its stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _held_while_importing(signum: int, frame, act: Callable[[], None]) -> bool:
    """Hold the stop signal ``signum`` if an import runs (see the module docstring): ``act`` is called
    once none does. False (not held) when no import runs, or when a stop signal is held already
    (that one is then dropped: this one acts at once)."""
    global _held
    if _held is not None:
        _release()
        return False
    if not _importing(frame):
        return False
    _held = (signum, act, signal.signal(signal.SIGALRM, _check_held))
    signal.setitimer(signal.ITIMER_REAL, _IMPORT_CHECK_S)
    return True


def _release() -> None:
    """Forget the held stop signal: no more checks, the SIGALRM handler as it was."""
    global _held
    before = _held[2]
    _held = None
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, before if before is not None else signal.SIG_DFL)


def _check_held(signum, frame) -> None:
    if _held is None:
        return
    if _importing(frame):
        signal.setitimer(signal.ITIMER_REAL, _IMPORT_CHECK_S)
        return
    held, act, _ = _held
    _release()
    if signal.getsignal(held) is not _note:  # (under noted_only() the signal is only noted)
        act()


def install() -> None:
    """Process-wide (main thread only): SIGINT and SIGTERM raise ``KeyboardInterrupt``, noted."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise)


@contextlib.contextmanager
def noted_only() -> Iterator[None]:
    """A block that stop signals do not interrupt, only noted (main thread only): the command's
    outcome is decided and being told (its summary JSON, its last line), so a signal then changes
    nothing and must not cut that short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _note) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def reset() -> None:
    """Forget the stop signals noted so far (a command starting in a process that ran others)."""
    _received.clear()


def stop_received() -> bool:
    """Whether a stop signal came since the last :func:`reset` (the command's start)."""
    return bool(_received)


def exit_status() -> int:
    """130 after Ctrl-C, 143 after SIGTERM: the first stop signal received (130 if none was noted)."""
    return STOP_SIGNALS.get(_received[0], 130) if _received else 130


def caused_by_stop(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised while handling, a stop signal's ``KeyboardInterrupt``: Python
    wraps one raised inside some hooks (a class's ``__set_name__`` while a module imports, on 3.11)
    in a ``RuntimeError``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def stop_message() -> str:
    """One line saying why the command stopped."""
    return "stopped by SIGTERM" if exit_status() == 143 else "interrupted (Ctrl-C)"


class InterruptGuard:
    """Stop-signal handling for one job (see the module docstring)."""

    def __init__(self) -> None:
        self._depth = 0  # nesting of protect() blocks
        self._pending = False  # a stop signal arrived inside a protected block
        self._stopping = False
        self.count = 0  # stop signals received

    def _handler(self, signum, frame) -> None:
        self.count += 1
        _note(signum)
        if not _held_while_importing(signum, frame, self._act):
            self._act()

    def _act(self) -> None:
        if self._depth or self._stopping:
            self._pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[InterruptGuard]:
        """Route SIGINT and SIGTERM through this guard for the block (only from the main thread;
        elsewhere the handlers stay as they are)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handler) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextlib.contextmanager
    def protect(self) -> Iterator[None]:
        """A block that a stop signal does not interrupt; one received inside it is raised as
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
        """The job is shutting down: from now on a stop signal is only noted, not raised."""
        self._stopping = True
