"""Resolve a model name to a folder, read its weights, build our model and its tokenizer.

A model can be: a local Hugging Face folder (config.json + safetensors / pytorch_model.bin,
sharded or not), a local CTranslate2 Whisper folder (model.bin), a packaged model name
(``tiny.en`` — the embedded default — or ``base``), or a hub id found in the HF cache. The hub
itself is only asked when online (``HF_HUB_OFFLINE`` unset).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

from encdec_models.registry import (  # noqa: F401 (ModelNotFoundError: re-exported)
    ModelNotFoundError,
    architecture_of,
    has_tokenizer,
    model_class,
    resolve_model_path,
)

DEFAULT_MODEL = "tiny.en"


class UnsafeCheckpointError(ValueError):
    """A weights file that is refused (it could run code) or cannot be read."""


@dataclass
class LoadedModel:
    """A model ready for the engine, with what the tasks need to build requests."""

    model: torch.nn.Module
    tokenizer: object  # a transformers tokenizer; None for a folder without tokenizer files
    config: object  # the transformers config
    generation_config: GenerationConfig
    architecture: str
    path: Path
    extra: dict = field(default_factory=dict)  # e.g. CTranslate2 alignment heads, lang ids


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return table[dtype]


def iter_checkpoint(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from safetensors or pytorch_model.bin files, sharded or not."""
    for stem, index_name in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        index = folder / index_name
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / stem).exists():
            files = [stem]
        else:
            continue
        for f in files:
            if f.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(folder / f, framework="pt") as sf:
                    for k in sf.keys():
                        yield k, sf.get_tensor(k)
            else:
                yield from _torch_load(folder / f).items()
        return
    raise ModelNotFoundError(f"no weights in {folder} (model.safetensors or pytorch_model.bin)")


def _torch_load(path: Path) -> dict:
    """A pytorch_model.bin's tensors; a file that would run code (a pickle of other objects) is refused."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"unsupported GLOBAL (\S+)", str(e))
        if found is None:
            raise UnsafeCheckpointError(f"{path} is not a readable PyTorch checkpoint ({e})") from None
        raise UnsafeCheckpointError(
            f"{path} was not loaded: besides tensors it holds Python objects, which could run code (it "
            f"names {found[1]}). Use a model whose weights are in model.safetensors, or convert this one "
            "where you trust it"
        ) from None


# self-attention q/k/v fuse into qkv_proj; cross-attention k/v into kv_proj: (fused name, shard, shards)
_PACKED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0, 3),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1, 3),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2, 3),
    "encoder_attn.k_proj": ("encoder_attn.kv_proj", 0, 2),
    "encoder_attn.v_proj": ("encoder_attn.kv_proj", 1, 2),
}
_PACKED_RE = re.compile(r"(self_attn|encoder_attn)\.(q|k|v)_proj\.(weight|bias)$")


def load_weights(model: torch.nn.Module, tensors, rename) -> None:
    """Copy checkpoint tensors into ``model``, fusing q/k/v; ``rename`` maps checkpoint names to
    ours (None = skip). A fused bias shard absent from the checkpoint (Whisper's k_proj) is zero;
    a parameter the model's optional ``fill_missing(name) -> bool`` hook handles (a tied lm_head, a
    zero logits bias) is the model's business; any other missing parameter is an error."""
    params = dict(model.named_parameters())
    fill_missing = getattr(model, "fill_missing", None)
    todo = {(n, s) for n, p in params.items() for s in range(_shards(n))}
    for name, w in tensors:
        ours = rename(name)
        if ours is None:
            continue
        shard, shards = 0, 1
        m = _PACKED_RE.search(ours)
        if m and f"{m[1]}.{m[2]}_proj" in _PACKED:
            fused, shard, shards = _PACKED[f"{m[1]}.{m[2]}_proj"]
            ours = ours[: m.start()] + f"{fused}.{m[3]}"
        if ours not in params:
            continue  # unused checkpoint tensors (e.g. HF buffers)
        p = params[ours]
        rows = p.shape[0] // shards
        dst = p.data[shard * rows : (shard + 1) * rows] if shards > 1 else p.data
        if tuple(dst.shape) != tuple(w.shape):
            raise ValueError(f"weight {name}: checkpoint shape {tuple(w.shape)} != model {tuple(dst.shape)}")
        dst.copy_(w)
        todo.discard((ours, shard))
    missing = []
    for n, s in todo:
        if n.endswith(".bias") and _shards(n) > 1:
            p = params[n]
            rows = p.shape[0] // _shards(n)
            p.data[s * rows : (s + 1) * rows].zero_()
        elif fill_missing is None or not fill_missing(n):
            missing.append(n)
    if missing:
        raise ValueError("checkpoint lacks weights: " + ", ".join(sorted(missing)[:10]))


def _shards(name: str) -> int:
    return 3 if ".qkv_proj." in name else 2 if ".kv_proj." in name else 1


def build_model(arch: str, config, tensors, device: torch.device, dtype: torch.dtype, prune=None):
    """``prune(model)``: called on the model before its weights exist (meta device), e.g. to drop
    the layers another pipeline stage holds: their weights are then never allocated nor read."""
    cls = model_class(arch)
    if hasattr(cls, "check_dtype"):
        cls.check_dtype(dtype)
    with torch.device("meta"):
        model = cls(config)
    if prune is not None:
        prune(model)
    model = model.to_empty(device=device).to(dtype)
    if hasattr(model, "adapt_checkpoint"):  # e.g. T5Gemma: grouped-query K/V repeated to every head
        tensors = model.adapt_checkpoint(tensors)
    load_weights(model, tensors, model.rename)
    if hasattr(model, "post_load"):
        model.post_load()
    return model.eval().requires_grad_(False)


def load_model(
    name: str | os.PathLike = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    prune=None,
) -> LoadedModel:
    """Load any supported model for the engine (see module docstring for what ``name`` may be);
    ``prune``: see ``build_model``."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = resolve_model_path(name)
    if not (path / "config.json").exists() or (path / "model.bin").exists():
        return _load_ctranslate2(path, dev, dt, prune)
    config = read_config(path)
    arch = architecture_of(config)
    gen = generation_config_of(path, config)
    model = build_model(arch, config, iter_checkpoint(path), dev, dt, prune)
    # a folder without tokenizer files runs on token ids (Request inputs and prompts, Result.token_ids)
    tok = AutoTokenizer.from_pretrained(path) if has_tokenizer(path) else None
    return LoadedModel(model, tok, config, gen, arch, path)


def read_config(path: Path):
    """The folder's transformers config; where the installed transformers does not know its model
    type, our model class's own reading of config.json (``config_from_dict``, T5Gemma 2 on
    transformers < 5.2x), else the transformers error."""
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as e:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        try:
            arch = architecture_of(SimpleNamespace(architectures=raw.get("architectures"),
                                                   model_type=raw.get("model_type")))  # fmt: skip
        except ValueError:
            raise e from None
        from_dict = getattr(model_class(arch), "config_from_dict", None)
        if from_dict is None:
            raise
        return from_dict(raw)


def generation_config_of(path: Path, config) -> GenerationConfig:
    """The folder's generation_config.json, else (as transformers does) the one config.json implies
    (a config read without transformers: its token ids)."""
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        if isinstance(config, SimpleNamespace):
            ids = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
            return GenerationConfig(**{k: getattr(config, k, None) for k in ids})
        return GenerationConfig.from_model_config(config)


def _load_ctranslate2(path: Path, device, dtype, prune=None) -> LoadedModel:
    from encdec_models.ctranslate2 import load_ctranslate2_whisper

    config, state, info = load_ctranslate2_whisper(path)
    arch = "WhisperForConditionalGeneration"
    model = build_model(arch, config, state.items(), device, dtype, prune)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    gen = whisper_generation_config(config, tok, info)
    return LoadedModel(model, tok, config, gen, arch, path, extra=info)


def whisper_generation_config(config, tok, info: dict) -> GenerationConfig:
    """A Whisper GenerationConfig (as transformers ships with the checkpoints) for a folder that
    has none, e.g. CTranslate2: special token ids from the tokenizer, suppress lists from info."""
    vocab = tok.get_vocab()
    langs = {t: i for t, i in vocab.items() if re.fullmatch(r"<\|[a-z]{2,3}\|>", t)}
    multilingual = config.vocab_size >= 51865
    gen = GenerationConfig(
        decoder_start_token_id=vocab["<|startoftranscript|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        bos_token_id=vocab["<|endoftext|>"],
        max_length=config.max_target_positions,
        suppress_tokens=list(info.get("suppress_tokens", [])),
        begin_suppress_tokens=list(info.get("begin_suppress_tokens", [])),
        no_timestamps_token_id=vocab["<|notimestamps|>"],
        is_multilingual=multilingual,
    )
    if multilingual:
        gen.lang_to_id = langs
        gen.task_to_id = {"transcribe": vocab["<|transcribe|>"], "translate": vocab["<|translate|>"]}
    if info.get("alignment_heads") is not None:
        gen.alignment_heads = info["alignment_heads"]
    return gen
