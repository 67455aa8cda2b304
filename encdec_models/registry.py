"""Hugging Face ``architectures`` name -> our model class."""

from __future__ import annotations

import importlib

# architecture name -> "module:Class"
ARCHITECTURES = {
    "WhisperForConditionalGeneration": "encdec_models.whisper:Whisper",
    "BartForConditionalGeneration": "encdec_models.bart:Bart",
    "MBartForConditionalGeneration": "encdec_models.bart:Bart",
    "MarianMTModel": "encdec_models.bart:Bart",
    "PegasusForConditionalGeneration": "encdec_models.bart:Bart",
    "T5ForConditionalGeneration": "encdec_models.t5:T5",
    "MT5ForConditionalGeneration": "encdec_models.t5:T5",
}

# config.model_type -> architecture, for configs without an ``architectures`` list
MODEL_TYPES = {
    "whisper": "WhisperForConditionalGeneration",
    "bart": "BartForConditionalGeneration",
    "mbart": "MBartForConditionalGeneration",
    "marian": "MarianMTModel",
    "pegasus": "PegasusForConditionalGeneration",
    "t5": "T5ForConditionalGeneration",
    "mt5": "MT5ForConditionalGeneration",
}


class UnsupportedModelError(ValueError):
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
