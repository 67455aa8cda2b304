"""Atomic file commits: write a temp file beside the target, fsync it, rename it over.

A reader (or a re-run after a crash) sees either the old file or the complete new
one, never a truncated file that looks complete. The temp file lives in the same
directory as the target (``os.replace`` is only atomic within one file system); its
name starts with ``.`` and ends with ``.<pid>.tmp`` so it is hidden and easy to clean.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_dir",
    "remove_dir",
    "remove_stale_temps",
]

_WRITE_MODES = {"w", "wt", "wb", "x", "xt", "xb"}
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[0-9a-f]{8}\.(?P<pid>\d+)\.tmp$")  # see _reserve_temp


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename/create/unlink in ``directory`` durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _reserve_temp(target: Path) -> Path:
    """Create an empty, exclusive temp file beside ``target`` and return its path."""
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.{os.getpid()}.tmp")
        try:
            # 0o666 & ~umask, like open(): the committed file gets normal permissions.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temp file beside {target}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on clean exit fsync it and rename it onto ``path``.

    For writers that want a path rather than a file object (e.g. ``pyarrow``). The
    temp file exists (empty) when the block starts; the block may overwrite it. On an
    exception the temp file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _reserve_temp(target)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str],
    mode: str = "w",
    encoding: str | None = "utf-8",
    newline: str | None = None,
) -> Iterator[IO[Any]]:
    """Open ``path`` for writing so that it appears whole or not at all.

    ``mode`` is ``"w"``/``"wt"`` (text, ``encoding``/``newline`` apply) or ``"wb"``.
    The file object is flushed, fsynced and closed before the rename.
    """
    if mode not in _WRITE_MODES:
        raise ValueError(f"atomic_open supports write modes {sorted(_WRITE_MODES)}, not {mode!r}")
    mode = mode.replace("x", "w")
    binary = "b" in mode
    with atomic_path(path) as tmp:
        if binary:
            f = open(tmp, "wb")  # noqa: SIM115 - closed below, before the rename
        else:
            f = open(tmp, "w", encoding=encoding, newline=newline)  # noqa: SIM115
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def remove_stale_temps(
    directory: str | os.PathLike[str], target_name: str | None = None, recursive: bool = False
) -> list[Path]:
    """Delete the temp files of commits that never finished (their writer was killed) from
    ``directory`` (and its subfolders with ``recursive``); with ``target_name``, only those of that
    target. A temp file whose writing process still runs is kept. Returns the paths deleted."""
    removed = []
    for root, _, files in os.walk(directory) if recursive else [(directory, None, _listdir(directory))]:
        for name in files:
            m = _TEMP_NAME.match(name)
            if m is None or (target_name is not None and m["target"] != target_name):
                continue
            if _pid_alive(int(m["pid"])):
                continue
            path = Path(root) / name
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(path) if path.is_dir() else path.unlink()  # a folder: see remove_dir
                removed.append(path)
    return removed


def _listdir(directory: str | os.PathLike[str]) -> list[str]:
    try:
        return os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Atomically replace ``path`` with ``data``; returns the path."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Atomically replace ``path`` with ``text`` (written verbatim, no newline translation)."""
    with atomic_open(path, "w", encoding=encoding, newline="") as f:
        f.write(text)
    return Path(path)


def remove_dir(directory: str | os.PathLike[str]) -> None:
    """Delete ``directory`` and what it holds so that its path is free at once: it is renamed to a
    temp name beside it first (a crash while deleting leaves a temp that remove_stale_temps deletes)."""
    d = Path(directory)
    tmp = d.with_name(f".{d.name}.{secrets.token_hex(4)}.{os.getpid()}.tmp")
    try:
        os.rename(d, tmp)
    except FileNotFoundError:
        return
    shutil.rmtree(tmp, ignore_errors=True)
