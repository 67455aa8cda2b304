"""Data parallelism on one machine (``--data-parallel N``): N rank processes, one engine each, fed
work units by the job's process, which stays the only writer.

The job's process (the parent) plans the work as before (the inputs, the manifest or the table's
resume state, output names) and hands units (an audio file; a block of table rows) to the ranks on
demand: a rank asks for the next unit when its engine has room, so a slow or busy rank never holds
the job back. A rank decodes its audio or tokenizes its rows itself (the reading scales with the
ranks), runs its engine and sends each result back; the parent feeds the results to exactly the
sinks, manifest, progress and summary of a one-process job, so the outputs are the same files, rows
in input order, one manifest, one summary and the same exit statuses.

A rank that dies (killed, out of memory, a driver fault) costs only its units in flight: each is
sent once more to another rank, else (it failed twice, or no rank is left) recorded as failed with
the reason. The job then finishes and exits with status 1. A stop signal (Ctrl-C, SIGTERM) goes to
the parent only (the ranks ignore both): it stops the ranks, saves what finished and exits with
130 / 143; a re-run resumes. Ranks are started with ``torch.multiprocessing`` (spawn) and talk to
the parent over one pipe each way, so a rank killed mid-message can garble nothing but its own pipe.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from encdec_cli.errors import UsageError
from encdec_cli.tasks.ranks import END, EngineSpec, Work, rank_main

RETRIES = 1  # a unit whose rank died is sent to another rank this many times


def rank_devices(device: str, data_parallel: int | None) -> list[str]:
    """The device of each rank: ``--device`` as a comma-separated list names them (``cuda:0,cuda:0``
    puts two ranks on one GPU); else ``data_parallel`` ranks on ``cpu`` (``--device cpu``) or on
    ``cuda:0 .. cuda:N-1``. One device means one process (no ranks). Raises UsageError."""
    listed = [d.strip() for d in device.split(",") if d.strip()]
    if len(listed) > 1:
        if data_parallel not in (None, len(listed)):
            raise UsageError(
                f"--data-parallel {data_parallel} does not match the {len(listed)} devices of --device "
                f"{device}: give one of them (the devices list says how many ranks run)"
            )
        gpus = [d for d in listed if d != "cpu"]
        if gpus:
            import torch

            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            for d in gpus:
                index = d.partition(":")[2]
                if not d.startswith("cuda") or (index and not index.isdigit()):
                    raise UsageError(f"--device {device}: {d!r} is not cpu, cuda or cuda:N")
                if int(index or 0) >= have:
                    raise UsageError(f"--device {device}: no {d} here ({have} CUDA device(s); use cpu)")
        return listed
    n = 1 if data_parallel is None else data_parallel
    if n < 1:
        raise UsageError(f"--data-parallel takes a number of processes >= 1, got {n}")
    one = listed[0] if listed else "auto"
    if n == 1:
        return [one]
    if one == "cpu":
        return ["cpu"] * n
    if one not in ("auto", "cuda"):
        raise UsageError(
            f"--data-parallel {n} with --device {one}: name every rank's device instead "
            f"(--device {','.join([one] * n)} puts all {n} ranks on {one})"
        )
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have == 0:
        if one == "cuda":
            raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
        return ["cpu"] * n
    if n > have:
        raise UsageError(
            f"--data-parallel {n} needs {n} GPUs, this machine has {have}: pass --data-parallel {have}, "
            f"or list the devices (--device {','.join(f'cuda:{i % have}' for i in range(n))})"
        )
    return [f"cuda:{i}" for i in range(n)]


@dataclass
class _Rank:
    rank: int
    device: str
    proc: Any
    down: Connection
    up: Connection
    units: set[int] = field(default_factory=set)  # unit ids sent and not finished
    asked: bool = False  # waits for a unit
    ready: bool = False
    done: bool = False  # said goodbye ("exit") or failed ("fatal") or died
    stats: dict = field(default_factory=dict)


@dataclass
class RunReport:
    """What happened to the ranks of one run: shown in the job's summary (a death makes it exit 1)."""

    deaths: list[str] = field(default_factory=list)  # one message per rank that died
    stopped: bool = False  # every rank died before the work was done (a re-run does the rest)
    started: float | None = None  # time.perf_counter() when the first unit went out (all ranks ready)
    last_result: float | None = None  # time.perf_counter() when the last result came in
    oom_recoveries: int = 0
    max_num_seqs: int | None = None

    def notes(self) -> list[str]:
        notes = list(self.deaths)
        if self.stopped:
            notes.append("no rank was left to finish the job: run the same command again to finish it")
        return notes


def _why(exitcode: int | None) -> str:
    if exitcode is None:
        return "it stopped answering"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


class DataParallel:
    """The ranks of one job: ``devices[r]`` is rank r's device. :meth:`run` starts them, hands out
    units and returns when every unit is done (see the module docstring)."""

    def __init__(self, spec: EngineSpec, devices: list[str], log: Callable[[str], None] | None = None):
        self.spec, self.devices = spec, devices
        self.log = log or (lambda message: None)

    @property
    def size(self) -> int:
        return len(self.devices)

    def run(
        self,
        work: Work,
        units: Iterable[Any],
        on_result: Callable[[Any, Any], None],
        on_failed: Callable[[Any, str], None],
        remaining: Callable[[Any], Any] = lambda payload: payload,
        on_progress: Callable[[Any], None] | None = None,
    ) -> RunReport:
        """Run every payload of ``units`` (pulled lazily, in the parent) on some rank.
        ``on_result(payload, value)`` takes each result; a unit whose rank died is sent again as
        ``remaining(payload)`` (what of it has no result yet; None: nothing), or, when it cannot be,
        handed to ``on_failed(payload, message)``."""
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // self.size)
        report = RunReport()
        ranks: list[_Rank] = []  # by rank (see below)
        source = iter(units)
        exhausted = False
        retry: deque[int] = deque()
        inflight: dict[int, list] = {}  # unit id -> [payload, attempts, rank]
        next_id = 0
        try:

            def start(r: int) -> None:
                device = self.devices[r]
                share = (self.devices[:r].count(device), self.devices.count(device))
                if device == "cpu":
                    share = (0, 1)  # (each CPU rank has its own KV budget)
                down_r, down_w = ctx.Pipe(duplex=False)
                up_r, up_w = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=rank_main,
                    args=(r, device, share, self.spec, work, down_r, up_w, threads),
                    name=f"encdec-rank-{r}",
                    daemon=True,
                )
                proc.start()
                down_r.close()
                up_w.close()
                ranks[r] = _Rank(r, device, proc, down_w, up_r)

            # ranks that share a GPU start one after another (see shared_config); the others at once
            ranks = [None] * self.size  # type: ignore[list-item]
            later: dict[str, deque[int]] = {}
            for r, device in enumerate(self.devices):
                if device != "cpu" and device in later:
                    later[device].append(r)
                else:
                    later.setdefault(device, deque())
                    start(r)
            waiting_to_start = [r for q in later.values() for r in q]
            for r in waiting_to_start:  # placeholders until started: never asked, never done
                ranks[r] = _Rank(r, self.devices[r], None, None, None)  # type: ignore[arg-type]

            def start_next_on(device: str) -> None:
                if later.get(device):
                    start(later[device].popleft())

            def next_unit() -> int | None:
                nonlocal exhausted, next_id
                if retry:
                    return retry.popleft()
                if exhausted:
                    return None
                try:
                    payload = next(source)
                except StopIteration:
                    exhausted = True
                    return None
                inflight[next_id] = [payload, 0, None]
                next_id += 1
                return next_id - 1

            def give(rank: _Rank) -> None:
                """Answer a rank's request: a unit, END when nothing is left, or later. No rank gets
                work before every rank has loaded its engine (or failed to), so that the first one
                ready does not take the whole start of the job."""
                if not all(o.ready or o.done for o in ranks):
                    return
                unit = next_unit()
                if unit is None:
                    if not inflight or not any(o.units for o in ranks if not o.done):
                        # nothing left to hand out, nothing in flight that could come back for a retry
                        _send(rank, END)
                        rank.asked = False
                    return
                if report.started is None:
                    report.started = time.perf_counter()
                entry = inflight[unit]
                entry[2] = rank.rank
                rank.units.add(unit)
                rank.asked = False
                _send(rank, (unit, entry[0]))

            def _send(rank: _Rank, msg) -> None:
                try:
                    rank.down.send(msg)
                except OSError:  # it died meanwhile: found below
                    pass

            def died(rank: _Rank, why: str) -> None:
                rank.done, rank.asked = True, False
                start_next_on(rank.device)
                message = f"rank {rank.rank} ({rank.device}) died: {why}"
                report.deaths.append(message)
                self.log(message)
                alive = any(not o.done for o in ranks)
                for unit in sorted(rank.units):
                    entry = inflight[unit]
                    rest = remaining(entry[0])
                    if rest is None:
                        del inflight[unit]
                        continue
                    entry[0] = rest
                    if entry[1] < RETRIES and alive:
                        entry[1] += 1
                        retry.append(unit)
                    else:
                        del inflight[unit]
                        again = " (retried on another rank)" if entry[1] else ""
                        on_failed(rest, f"{message} while working on it{again}")
                rank.units.clear()

            def handle(rank: _Rank, msg: tuple) -> None:
                kind = msg[0]
                if kind == "want":
                    rank.asked = True
                    give(rank)
                elif kind == "result":
                    _, unit, value, last = msg
                    entry = inflight.get(unit)
                    if entry is None:
                        return
                    on_result(entry[0], value)
                    report.last_result = time.perf_counter()
                    if last:
                        del inflight[unit]
                        rank.units.discard(unit)
                elif kind == "progress":
                    if on_progress is not None:
                        on_progress(msg[1])
                elif kind == "ready":
                    rank.ready = True
                    start_next_on(rank.device)
                    self.log(f"rank {rank.rank} ready on {msg[1]} (pid {msg[2]})")
                elif kind == "exit":
                    rank.done, rank.stats = True, msg[1]
                elif kind == "fatal":
                    if not rank.ready and not any(o.ready for o in ranks):
                        raise UsageError(f"rank {rank.rank} ({rank.device}) could not start: {msg[1]}")
                    died(rank, f"{msg[1]}\n{msg[2]}" if os.environ.get("ENCDEC_DEBUG") else msg[1])

            while not all(r.done for r in ranks):
                live = [r for r in ranks if not r.done and r.proc is not None]
                wait([r.up for r in live] + [r.proc.sentinel for r in live], timeout=1.0)
                for rank in live:
                    try:
                        while not rank.done and rank.up.poll():
                            handle(rank, rank.up.recv())
                    except (EOFError, OSError):  # the pipe ended: the process is ending or gone
                        rank.proc.join(timeout=5)
                    if not rank.done and not rank.proc.is_alive():
                        died(rank, _why(rank.proc.exitcode))
                for rank in ranks:  # units that came back for a retry, or the end, for those waiting
                    if rank.asked and not rank.done:
                        give(rank)
            report.stopped = bool(retry) or not exhausted  # every rank died with work left
            for rank in ranks:
                if rank.stats:
                    report.oom_recoveries += rank.stats.get("oom_recoveries", 0)
                    seqs = rank.stats.get("max_num_seqs")
                    report.max_num_seqs = (
                        seqs if report.max_num_seqs is None else min(report.max_num_seqs, seqs)
                    )
            return report
        finally:
            ranks = [r for r in ranks if r is not None and r.proc is not None]
            for rank in ranks:  # closing its pipe ends a rank at its next request; then it is stopped
                rank.down.close()
            deadline = time.monotonic() + 3
            for rank in ranks:
                rank.proc.join(timeout=max(0.0, deadline - time.monotonic()))
                if rank.proc.is_alive():
                    rank.proc.kill()
                    rank.proc.join()
                rank.up.close()


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """``items`` in lists of ``size`` (the last one shorter), pulled lazily."""
    block: list[Any] = []
    for item in items:
        block.append(item)
        if len(block) >= size:
            yield block
            block = []
    if block:
        yield block
