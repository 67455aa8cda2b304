"""Atomic writes: whole file or old file, never a temp file left behind."""

from __future__ import annotations

import os

import pytest

from encdec_cli.io.atomic import atomic_open, atomic_path, atomic_write_bytes, atomic_write_text


def test_write_text_and_bytes_create_parents(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    assert atomic_write_text(target, "héllo\r\n") == target
    assert target.read_bytes() == "héllo\r\n".encode()  # written verbatim
    atomic_write_bytes(target, b"\x00\xff")
    assert target.read_bytes() == b"\x00\xff"
    assert os.listdir(target.parent) == ["out.txt"]


def test_exception_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(target, "w") as f:
        f.write("partial new content")
        tmp_names = [n for n in os.listdir(tmp_path) if n != "out.json"]
        assert len(tmp_names) == 1
        assert tmp_names[0].startswith(".out.json.") and tmp_names[0].endswith(f".{os.getpid()}.tmp")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.json"]


def test_atomic_path_for_path_writers(tmp_path):
    target = tmp_path / "x.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.exists()
        tmp.write_bytes(b"data")
        assert not target.exists()
    assert target.read_bytes() == b"data"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"data"
    assert os.listdir(tmp_path) == ["x.bin"]


def test_committed_file_has_normal_permissions(tmp_path):
    target = tmp_path / "p.txt"
    atomic_write_text(target, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_rejects_read_modes(tmp_path):
    with pytest.raises(ValueError, match="write modes"), atomic_open(tmp_path / "x", "r"):
        pass
