"""Model names -> folders, and what a folder holds: its architecture and our model class.

Everything here reads only names, config and tokenizer files (never weights) and imports neither
torch nor transformers, so the CLI checks that a model fits the command before loading it.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

# architecture name -> "module:Class"
ARCHITECTURES = {
    "WhisperForConditionalGeneration": "encdec_models.whisper:Whisper",
    "BartForConditionalGeneration": "encdec_models.bart:Bart",
    "MBartForConditionalGeneration": "encdec_models.bart:Bart",
    "MarianMTModel": "encdec_models.bart:Bart",
    "PegasusForConditionalGeneration": "encdec_models.bart:Bart",
    "M2M100ForConditionalGeneration": "encdec_models.bart:Bart",  # M2M100 and NLLB-200
    "T5ForConditionalGeneration": "encdec_models.t5:T5",
    "MT5ForConditionalGeneration": "encdec_models.t5:T5",
    "VisionEncoderDecoderModel": "encdec_models.vision:VisionEncoderDecoder",
    "Florence2ForConditionalGeneration": "encdec_models.florence2:Florence2",
    "T5GemmaForConditionalGeneration": "encdec_models.t5gemma:T5Gemma",
    "MoonshineForConditionalGeneration": "encdec_models.moonshine:Moonshine",
}

# config.model_type -> architecture, for configs without an ``architectures`` list
MODEL_TYPES = {
    "whisper": "WhisperForConditionalGeneration",
    "bart": "BartForConditionalGeneration",
    "mbart": "MBartForConditionalGeneration",
    "marian": "MarianMTModel",
    "pegasus": "PegasusForConditionalGeneration",
    "m2m_100": "M2M100ForConditionalGeneration",
    "t5": "T5ForConditionalGeneration",
    "mt5": "MT5ForConditionalGeneration",
    "vision-encoder-decoder": "VisionEncoderDecoderModel",
    "florence2": "Florence2ForConditionalGeneration",
    "t5gemma": "T5GemmaForConditionalGeneration",
    "moonshine": "MoonshineForConditionalGeneration",
}
# image-to-text models (encdec image-to-text)
VISION = frozenset({"VisionEncoderDecoderModel", "Florence2ForConditionalGeneration"})

WHISPER = "WhisperForConditionalGeneration"
SPEECH = frozenset({WHISPER, "MoonshineForConditionalGeneration"})  # architectures `transcribe` takes
MULTILINGUAL_VOCAB = 51865  # English-only Whisper models have 51864 tokens; multilingual >= 51865
MULTILINGUAL_EOT = 50257  # <|endoftext|> of the multilingual tokenizer (English-only: 50256)
_LANGUAGE_TOKEN = re.compile(r"<\|([a-z]{2,3})\|>")
# files any transformers tokenizer is read from; a folder with none of them has no tokenizer
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "source.spm",
    "tokenizer.model",
)
HOW_TO_GET_A_MODEL = (
    "pass -m a local Hugging Face model folder (config.json, weights, tokenizer), or a hub id "
    "already in the Hugging Face cache: on a machine with internet run `hf download ID` (or "
    "`huggingface-cli download ID`) and copy its cache folder ({cache}) to this machine"
)


class UnsupportedModelError(ValueError):
    pass


class ModelNotFoundError(FileNotFoundError):
    pass


def architecture_of(config) -> str:
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in ARCHITECTURES:
            return arch
    if config.model_type in MODEL_TYPES and not archs:
        return MODEL_TYPES[config.model_type]
    raise UnsupportedModelError(
        f"unsupported model architecture {archs or config.model_type!r}; encdec supports: "
        + ", ".join(sorted(ARCHITECTURES))
    )


def model_class(arch: str):
    module, name = ARCHITECTURES[arch].split(":")
    return getattr(importlib.import_module(module), name)


def how_to_get_a_model() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return HOW_TO_GET_A_MODEL.format(cache=HF_HUB_CACHE)


def resolve_model_path(name: str | os.PathLike) -> Path:
    """Local folder, packaged model, or HF cache (hub only when online); clear error otherwise."""
    p = Path(name).expanduser()
    if p.is_dir():
        if (p / "config.json").exists() or (p / "model.bin").exists():
            return p
        raise ModelNotFoundError(
            f"{p} is a folder but holds neither config.json (Hugging Face) nor model.bin (CTranslate2)"
        )
    from encdec_models.packaged import find_packaged_model

    found = find_packaged_model(str(name))
    if found is not None:
        return found
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(name)):
        raise ModelNotFoundError(f"model {str(name)!r} not found: no such folder; " + how_to_get_a_model())
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name), local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        why = "HF_HUB_OFFLINE is set"
    else:
        try:
            return Path(snapshot_download(str(name)))
        except Exception as e:  # network errors, unknown repo
            why = f"{type(e).__name__}: no network, or no such model there"
    raise ModelNotFoundError(
        f"model {str(name)!r} is neither a local folder nor in the Hugging Face cache, and the Hugging Face "
        f"hub could not be reached ({why}). To use it, " + how_to_get_a_model()
    )


@dataclass(frozen=True)
class ModelInfo:
    """What a model folder holds, read from its config and tokenizer files only."""

    path: Path
    architecture: str
    ctranslate2: bool  # a CTranslate2 Whisper folder (model.bin), else a Hugging Face folder
    multilingual: bool | None  # Whisper: several languages (None: cannot tell without the weights)
    languages: frozenset[str]  # Whisper language codes its tokenizer has (may be empty: unknown)
    has_tokenizer: bool = True  # tokenizer files are there (without: token ids in, token ids out)

    @property
    def is_whisper(self) -> bool:
        return self.architecture == WHISPER

    @property
    def is_vision(self) -> bool:
        return self.architecture in VISION

    @property
    def is_speech(self) -> bool:
        return self.architecture in SPEECH


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnsupportedModelError(f"{path} is not valid JSON ({e})") from None


def inspect_model(path: Path) -> ModelInfo:
    """The architecture of the model in ``path`` (a folder from :func:`resolve_model_path`) and, for
    Whisper, whether it is multilingual and its language codes."""
    ct2 = (path / "model.bin").exists() or not (path / "config.json").exists()
    if ct2:  # CTranslate2: Whisper only; the vocabulary size tells English-only from multilingual
        arch, vocab_size = WHISPER, None
        if (path / "vocabulary.txt").is_file():
            with open(path / "vocabulary.txt", "rb") as f:
                vocab_size = sum(1 for _ in f)
        elif (path / "vocabulary.json").is_file():
            vocab_size = len(_read_json(path / "vocabulary.json"))
    else:
        config = _read_json(path / "config.json")
        if not isinstance(config, dict):
            raise UnsupportedModelError(f"{path / 'config.json'} is not a model config")
        arch = architecture_of(
            SimpleNamespace(architectures=config.get("architectures"), model_type=config.get("model_type"))
        )
        vocab_size = config.get("vocab_size")
    languages: frozenset[str] = frozenset()
    multilingual = None if arch != WHISPER or vocab_size is None else vocab_size >= MULTILINGUAL_VOCAB
    if arch == WHISPER and (path / "tokenizer.json").is_file():
        added = _read_json(path / "tokenizer.json").get("added_tokens") or []
        found = (_LANGUAGE_TOKEN.fullmatch(str(t.get("content", ""))) for t in added)
        languages = frozenset(m[1] for m in found if m)
        eot = [t.get("id") for t in added if t.get("content") == "<|endoftext|>"]
        if eot and isinstance(eot[0], int):  # whatever the vocabulary size (fine-tunes add or drop tokens),
            multilingual = eot[0] >= MULTILINGUAL_EOT  # the text vocabulary tells: multilingual has one more
    return ModelInfo(
        path, arch, ct2, multilingual, languages if multilingual else frozenset(), has_tokenizer(path)
    )


def has_tokenizer(path: Path) -> bool:
    """Whether the folder holds tokenizer files (:data:`TOKENIZER_FILES`)."""
    return any((path / f).is_file() for f in TOKENIZER_FILES)


def check_tokenizer(path: Path) -> None:
    """UnsupportedModelError for a folder without tokenizer files, where text must be read or written."""
    if not (path / "model.bin").exists() and not has_tokenizer(path):
        raise UnsupportedModelError(
            f"model {str(path)!r} has no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.json, "
            "spiece.model, ...): the commands read and write text, so copy the tokenizer into the folder "
            "(the Python API runs such a folder on token ids)"
        )
