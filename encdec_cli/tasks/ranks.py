"""What runs inside a rank process of a data-parallel job (``encdec_cli.tasks.data_parallel``): the
engine's loading, the supply of units from the job's process, and the rank's main function."""

from __future__ import annotations

import os
import queue
import signal
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

END = "end"  # the parent's answer to a rank's request when no work is left


@dataclass(frozen=True)
class EngineSpec:
    """How each rank loads its engine (picklable: it travels to the rank processes)."""

    path: str  # the model folder (resolved by the parent)
    dtype: str = "auto"
    config: tuple[tuple[str, Any], ...] = ()  # EngineConfig fields, as (name, value) pairs

    def load(self, device: str, share: tuple[int, int] = (0, 1)):
        from encdec_cli.engine import Engine

        return Engine(self.path, device=device, dtype=self.dtype, **shared_config(dict(self.config), share))


def shared_config(config: dict, share: tuple[int, int]) -> dict:
    """An engine's options when it is the ``k``-th of ``n`` ranks on one GPU (``share`` = (k, n)).
    ``gpu_memory_utilization`` caps the GPU's whole use, other processes' included, and the ranks
    of a GPU start one after another: the k-th may fill it up to (k + 1) / n of the cap."""
    k, n = share
    if n > 1:
        config["gpu_memory_utilization"] = config.get("gpu_memory_utilization", 0.9) * (k + 1) / n
    return config


class Work(Protocol):
    """A job's side in the ranks (picklable): ``serve`` runs units through ``engine`` until ``feed``
    ends, calling ``result(unit_id, value, last)`` for each result (``last``: the unit's final one)
    and ``progress(value)`` for the job's progress display."""

    def serve(
        self, engine, feed: Feed, result: Callable[[int, Any, bool], None], progress: Callable
    ) -> None: ...


class Feed:
    """A rank's supply of units: ``(unit_id, payload)`` pairs asked for from the parent. Iterate it
    (blocking), or call :meth:`poll` to ask without waiting. A thread takes each message off the pipe
    as it comes, so the parent never waits on a busy rank to send it a unit."""

    def __init__(self, down: Connection, send: Callable[[tuple], None]):
        self._send = send
        self._asked = False
        self.ended = False
        self._inbox: queue.Queue = queue.Queue()
        threading.Thread(target=self._receive, args=(down,), name="encdec-feed", daemon=True).start()

    def _receive(self, down: Connection) -> None:
        while True:
            try:
                msg = down.recv()
            except (EOFError, OSError):  # the parent is gone (or closed the pipe to stop this rank)
                self._inbox.put(EOFError)
                return
            self._inbox.put(msg)
            if msg == END:
                return

    def poll(self, timeout: float = 0.0) -> tuple[int, Any] | str | None:
        """The next unit, ``END`` when no work is left, or None if none came within ``timeout``.
        Raises EOFError when the parent is gone."""
        if self.ended:
            return END
        if not self._asked:
            self._send(("want",))
            self._asked = True
        try:
            msg = self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return None
        if msg is EOFError:
            raise EOFError("the job's process is gone")
        self._asked = False
        if msg == END:
            self.ended = True
            return END
        return msg

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        while True:
            unit = self.poll(1.0)
            if unit == END:
                return
            if unit is not None:
                yield unit


class UnitRequests:
    """A rank's units turned into engine requests, pulled as the engine has room: ``expand(unit,
    payload, count)`` yields a unit's requests and says how many results the unit will have
    (``count(n)``); :meth:`answer` hands each result to the parent, the unit's last one marked. The
    rank takes no more units while ``most`` results are outstanding, so that the ranks share the
    work instead of the first one to ask taking it all."""

    def __init__(self, engine, feed: Feed, result: Callable[[int, Any, bool], None], most: int):
        self.engine, self.feed, self.result, self.most = engine, feed, result, most
        self.left: dict[int, int] = {}  # unit -> its results still to come

    def answer(self, unit: int, value: Any) -> None:
        self.left[unit] -= 1
        if not self.left[unit]:
            del self.left[unit]
        self.result(unit, value, unit not in self.left)

    def requests(self, expand: Callable[[int, Any, Callable[[int], None]], Iterable[Any]]) -> Iterator[Any]:
        while True:
            if sum(self.left.values()) >= self.most:
                yield None  # enough work in hand: the engine runs a step first
                continue
            got = self.feed.poll(0.5 if self.engine.idle else 0.0)
            if got == END:
                return
            if got is None:
                yield None
                continue
            unit, payload = got

            def count(n: int, unit: int = unit) -> None:
                self.left[unit] = n

            yield from expand(unit, payload, count)


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the process that started it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def rank_main(rank: int, device: str, share: tuple[int, int], spec: EngineSpec, work: Work,
               down: Connection, up: Connection, threads: int) -> None:  # fmt: skip
    """A rank process: load the engine, serve units until the parent says there are no more."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the job (and the ranks)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    lock = threading.Lock()

    def send(msg: tuple) -> None:
        with lock:
            up.send(msg)

    try:
        import torch

        if device == "cpu":
            torch.set_num_threads(threads)
        elif device.startswith("cuda"):
            torch.cuda.set_device(device)  # kernels and CUDA graphs run on the current device
        engine = spec.load(device, share) if share[1] > 1 else spec.load(device)
        send(("ready", str(engine.device), os.getpid()))
        work.serve(
            engine,
            Feed(down, send),
            lambda unit_id, value, last: send(("result", unit_id, value, last)),
            lambda value: send(("progress", value)),
        )
        stats = engine.stats
        send(("exit", {"oom_recoveries": stats.oom_recoveries, "max_num_seqs": engine.max_num_seqs}))
    except (EOFError, BrokenPipeError, ConnectionResetError):  # the parent is gone: nothing to say
        return
    except BaseException as e:  # noqa: BLE001 - told to the parent, which records the rank's units
        try:
            send(("fatal", f"{type(e).__name__}: {e}", traceback.format_exc(limit=8)))
        except OSError:
            pass
