"""Load CTranslate2 (faster-whisper) Whisper checkpoints without the ctranslate2 package.

A CT2 model folder holds `model.bin` (all weights), `config.json` (Whisper decoding hints:
suppress_ids, suppress_ids_begin, lang_ids, alignment_heads) and `tokenizer.json`.

`model.bin` layout (little-endian; written by ctranslate2/specs/model_spec.py `_serialize`,
read by src/models/model.cc), a "string" being `u16 length (incl. NUL) + UTF-8 bytes + NUL`:

    u32 binary_version                       (6 today; Whisper exists since 5)
    string spec_name, u32 spec_revision      (binary_version >= 2; "WhisperSpec", revision 3)
    u32 num_variables, then per variable, sorted by name:
        string name, u8 rank, u32 dims[rank],
        u8 dtype_id, u32 num_bytes           (binary_version >= 4: id into _CT2_DTYPES)
        | u8 item_size, u32 num_items        (older: 4 -> float32, 2 -> int16, 1 -> int8)
        bytes data[num_bytes]                (row-major)
    u32 num_aliases, then (string alias, string target) pairs   (binary_version >= 3)

Rank-0 variables are model attributes (`encoder/num_heads` int16, `decoder/activation` ...).
A quantized weight `.../weight` (int8 or int16) comes with `.../weight_scale` (float32):
int8 is per output row, `w = q / scale[:, None]`; int16 has one scalar scale.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import torch

if TYPE_CHECKING:
    from transformers import WhisperConfig

# Index = dtype id in model.bin: the DataType enum order of include/ctranslate2/types.h.
_CT2_DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)
_LEGACY_ITEM_DTYPES = {4: torch.float32, 2: torch.int16, 1: torch.int8}  # binary_version < 4
_MAX_BINARY_VERSION = 6

# d_model -> attention heads of the released Whisper sizes (head dim is always 64); used only
# when model.bin does not store `encoder/num_heads` / `decoder/num_heads`.
_WHISPER_HEADS_BY_WIDTH = {384: 6, 512: 8, 768: 12, 1024: 16, 1280: 20}
_MULTILINGUAL_VOCAB = 51865  # English-only models have 51864 tokens; multilingual >= 51865


class CT2FormatError(ValueError):
    """A model.bin that is not a CTranslate2 Whisper model this loader understands."""


@dataclass(frozen=True)
class CT2ModelFile:
    """The raw contents of a CT2 model.bin."""

    binary_version: int  # file format version (6 for CTranslate2 >= 3.x)
    spec_name: str  # model specification, e.g. "WhisperSpec"
    spec_revision: int  # weight layout revision of that spec
    variables: dict[str, torch.Tensor]  # name -> tensor in its stored dtype (rank 0 for attributes)
    aliases: dict[str, str]  # alias name -> name of the variable it shares


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CT2FormatError(f"{getattr(f, 'name', 'model.bin')} is truncated (wanted {n} more bytes)")
    return data


def _read_u(f: BinaryIO, fmt: str) -> int:
    return struct.unpack(fmt, _read_exact(f, struct.calcsize(fmt)))[0]


def _read_str(f: BinaryIO) -> str:
    n = _read_u(f, "<H")  # length including the trailing NUL
    return _read_exact(f, n)[:-1].decode("utf-8")


def read_ct2_model_bin(path: str | Path) -> CT2ModelFile:
    """Parse a CT2 `model.bin`; every tensor is read straight into its own torch buffer."""
    path = Path(path)
    with open(path, "rb") as f:
        version = _read_u(f, "<I")
        if not 1 <= version <= _MAX_BINARY_VERSION:
            raise CT2FormatError(
                f"{path}: unsupported CTranslate2 binary version {version} (this loader reads 1.."
                f"{_MAX_BINARY_VERSION}); is this a CTranslate2 model.bin?"
            )
        spec_name, revision = "", 1
        if version >= 2:
            spec_name = _read_str(f)
            revision = _read_u(f, "<I")
        variables: dict[str, torch.Tensor] = {}
        for _ in range(_read_u(f, "<I")):
            name = _read_str(f)
            rank = _read_u(f, "<B")
            shape = struct.unpack(f"<{rank}I", _read_exact(f, 4 * rank))
            if version >= 4:
                dtype_id = _read_u(f, "<B")
                if dtype_id >= len(_CT2_DTYPES):
                    raise CT2FormatError(f"{path}: variable {name} has unknown dtype id {dtype_id}")
                dtype = _CT2_DTYPES[dtype_id]
                num_bytes = _read_u(f, "<I")
            else:
                item_size = _read_u(f, "<B")
                if item_size not in _LEGACY_ITEM_DTYPES:
                    raise CT2FormatError(f"{path}: variable {name} has unknown item size {item_size}")
                dtype = _LEGACY_ITEM_DTYPES[item_size]
                num_bytes = _read_u(f, "<I") * item_size
            if math.prod(shape) * dtype.itemsize != num_bytes:  # checked before allocating
                raise CT2FormatError(f"{path}: variable {name} {list(shape)} {dtype} has {num_bytes} bytes")
            tensor = torch.empty(shape, dtype=dtype)
            raw = tensor.view(-1).view(torch.uint8).numpy()  # the tensor's own bytes, writable
            if f.readinto(memoryview(raw)) != num_bytes:
                raise CT2FormatError(f"{path} is truncated inside variable {name}")
            variables[name] = tensor
        aliases: dict[str, str] = {}
        if version >= 3:
            for _ in range(_read_u(f, "<I")):
                alias = _read_str(f)
                aliases[alias] = _read_str(f)
    return CT2ModelFile(version, spec_name, revision, variables, aliases)


def _dequantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 per-row (`scale: [rows]`) or int16 per-tensor (scalar) weights -> float32."""
    w = weight.to(torch.float32)
    if scale.dim() == 0:
        return w / scale.to(torch.float32)
    return w / scale.to(torch.float32).reshape(-1, *([1] * (w.dim() - 1)))


def _float_weights(model: CT2ModelFile, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Non-attribute variables as floats (aliases resolved, quantized weights dequantized).

    Unquantized floats keep the stored dtype unless `dtype` is given; dequantized weights take
    `dtype`, else the dtype the layer norms were stored in (int8_float16 -> float16).
    """
    variables = dict(model.variables)
    for alias, target in model.aliases.items():
        variables[alias] = variables[target]
        if target + "_scale" in model.variables:
            variables[alias + "_scale"] = model.variables[target + "_scale"]
    norm_dtypes = [v.dtype for k, v in variables.items() if k.endswith("/gamma")]
    default = dtype or (norm_dtypes[0] if norm_dtypes else torch.float32)
    out: dict[str, torch.Tensor] = {}
    for name, value in variables.items():
        if value.dim() == 0 or name.endswith("_scale"):
            continue
        if value.dtype in (torch.int8, torch.int16):
            scale = variables.get(name + "_scale")
            if scale is None:
                raise CT2FormatError(f"quantized variable {name} has no {name}_scale")
            value = _dequantize(value, scale).to(default)
        elif dtype is not None:
            value = value.to(dtype)
        out[name] = value
    return out


def _attribute(model: CT2ModelFile, name: str) -> int | None:
    value = model.variables.get(name)
    return None if value is None or value.dim() != 0 else int(value.item())


def _split_rows(t: torch.Tensor, parts: int) -> list[torch.Tensor]:
    return [p.clone() for p in t.chunk(parts, dim=0)]  # clone: each tensor owns its storage


def _map_linear(src: dict[str, torch.Tensor], ct2: str, hf: str, out: dict[str, torch.Tensor]) -> None:
    out[f"{hf}.weight"] = src.pop(f"{ct2}/weight")
    bias = src.pop(f"{ct2}/bias", None)
    if bias is not None:
        out[f"{hf}.bias"] = bias


def _map_norm(src: dict[str, torch.Tensor], ct2: str, hf: str, out: dict[str, torch.Tensor]) -> None:
    out[f"{hf}.weight"] = src.pop(f"{ct2}/gamma")
    out[f"{hf}.bias"] = src.pop(f"{ct2}/beta")


def _map_fused(
    src: dict[str, torch.Tensor], ct2: str, hf: str, names: tuple[str, ...], out: dict[str, torch.Tensor]
) -> None:
    """Un-fuse a CT2 projection whose rows are `names` stacked (q;k;v or k;v).

    The k part of the fused bias is dropped: HF Whisper's k_proj has no bias (CT2 stores
    zeros there), and a key bias adds the same q.b to every score of a query, which the
    softmax cancels.
    """
    weights = _split_rows(src.pop(f"{ct2}/weight"), len(names))
    biases = _split_rows(src.pop(f"{ct2}/bias"), len(names))
    for name, w, b in zip(names, weights, biases, strict=True):
        out[f"{hf}.{name}.weight"] = w
        if name != "k_proj":
            out[f"{hf}.{name}.bias"] = b


def _map_layer(src: dict[str, torch.Tensor], ct2: str, hf: str, out: dict[str, torch.Tensor]) -> None:
    """One encoder or decoder layer: CT2 `{ct2}/...` -> HF `{hf}....`."""
    _map_norm(src, f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm", out)
    _map_fused(src, f"{ct2}/self_attention/linear_0", f"{hf}.self_attn", ("q_proj", "k_proj", "v_proj"), out)
    _map_linear(src, f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj", out)
    if f"{ct2}/attention/linear_0/weight" in src:  # decoder cross-attention
        _map_norm(src, f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm", out)
        _map_linear(src, f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj", out)
        _map_fused(src, f"{ct2}/attention/linear_1", f"{hf}.encoder_attn", ("k_proj", "v_proj"), out)
        _map_linear(src, f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj", out)
    _map_norm(src, f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm", out)
    _map_linear(src, f"{ct2}/ffn/linear_0", f"{hf}.fc1", out)
    _map_linear(src, f"{ct2}/ffn/linear_1", f"{hf}.fc2", out)


def _num_layers(variables: dict[str, torch.Tensor], stack: str) -> int:
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    if indices != set(range(len(indices))):
        raise CT2FormatError(f"{stack} layers are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def ct2_whisper_to_hf_state_dict(
    model: CT2ModelFile, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], int, int]:
    """CT2 Whisper variables -> (HF `WhisperForConditionalGeneration` state dict, n_enc, n_dec layers)."""
    if model.spec_name != "WhisperSpec":
        raise CT2FormatError(f"model.bin holds a {model.spec_name or 'pre-2.0'} model, not WhisperSpec")
    src = _float_weights(model, dtype)
    n_enc, n_dec = _num_layers(src, "encoder"), _num_layers(src, "decoder")
    out: dict[str, torch.Tensor] = {}
    _map_linear(src, "encoder/conv1", "model.encoder.conv1", out)
    _map_linear(src, "encoder/conv2", "model.encoder.conv2", out)
    out["model.encoder.embed_positions.weight"] = src.pop("encoder/position_encodings/encodings")
    for i in range(n_enc):
        _map_layer(src, f"encoder/layer_{i}", f"model.encoder.layers.{i}", out)
    _map_norm(src, "encoder/layer_norm", "model.encoder.layer_norm", out)
    out["model.decoder.embed_tokens.weight"] = src.pop("decoder/embeddings/weight")
    out["model.decoder.embed_positions.weight"] = src.pop("decoder/position_encodings/encodings")
    for i in range(n_dec):
        _map_layer(src, f"decoder/layer_{i}", f"model.decoder.layers.{i}", out)
    _map_norm(src, "decoder/layer_norm", "model.decoder.layer_norm", out)
    # The output projection is an alias of the token embedding in every released Whisper
    # (`tie_word_embeddings`); an untied one is kept as its own tensor.
    out["proj_out.weight"] = src.pop("decoder/projection/weight")
    if src.pop("decoder/projection/bias", None) is not None:
        raise CT2FormatError("decoder/projection has a bias; HF Whisper's proj_out has none")
    if src:
        raise CT2FormatError(
            f"unexpected variables in a Whisper model.bin (lite/low-rank Whisper is not supported): "
            f"{', '.join(sorted(src)[:8])}"
        )
    return out, n_enc, n_dec


def _heads(model: CT2ModelFile, stack: str, d_model: int) -> int:
    heads = _attribute(model, f"{stack}/num_heads")
    if heads is None:
        heads = _WHISPER_HEADS_BY_WIDTH.get(d_model)
    if heads is None:
        raise CT2FormatError(
            f"model.bin does not store {stack}/num_heads and d_model={d_model} is not a known Whisper size"
        )
    return heads


def _special_tokens(folder: Path, vocab_size: int) -> dict[str, int]:
    """Special token string -> id, from tokenizer.json's added tokens (or Whisper's defaults)."""
    path = folder / "tokenizer.json"
    if path.exists():
        added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens", [])
        return {t["content"]: int(t["id"]) for t in added}
    if vocab_size not in (_MULTILINGUAL_VOCAB - 1, _MULTILINGUAL_VOCAB):
        raise CT2FormatError(f"{folder} has no tokenizer.json to name the special tokens of this vocabulary")
    # openai-whisper's layout for the original English-only / multilingual vocabularies.
    eot = 50256 if vocab_size < _MULTILINGUAL_VOCAB else 50257
    names = ["<|endoftext|>", "<|startoftranscript|>"]
    tokens = {name: eot + i for i, name in enumerate(names)}
    task_base = eot + 2 + 99  # 99 language tokens follow <|startoftranscript|>
    for i, name in enumerate(["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>"]):
        tokens[name] = task_base + i
    tokens["<|nocaptions|>"] = task_base + 4
    tokens["<|notimestamps|>"] = task_base + 5
    return tokens


_LANGUAGE_TOKEN = re.compile(r"^<\|([a-z]{2,3}|yue)\|>$")


def _generation_info(folder: Path, ct2_config: dict, vocab_size: int) -> dict:
    """Decoding hints in HF `WhisperGenerationConfig` names (+ `lang_ids`, `timestamp_begin`)."""
    tokens = _special_tokens(folder, vocab_size)

    def tid(name: str, alt: str | None = None) -> int | None:
        return tokens.get(name, tokens.get(alt) if alt else None)

    eot = tid("<|endoftext|>")
    no_timestamps = tid("<|notimestamps|>")
    is_multilingual = vocab_size >= _MULTILINGUAL_VOCAB
    lang_to_id = {t: i for t, i in tokens.items() if _LANGUAGE_TOKEN.match(t)} if is_multilingual else {}
    return {
        "decoder_start_token_id": tid("<|startoftranscript|>"),
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "no_timestamps_token_id": no_timestamps,
        "timestamp_begin": None if no_timestamps is None else no_timestamps + 1,
        "prev_sot_token_id": tid("<|startofprev|>"),
        "no_speech_token_id": tid("<|nospeech|>", "<|nocaptions|>"),
        "task_to_id": {
            task: tokens[f"<|{task}|>"] for task in ("transcribe", "translate") if f"<|{task}|>" in tokens
        },
        "is_multilingual": is_multilingual,
        "lang_to_id": lang_to_id,
        "lang_ids": list(ct2_config.get("lang_ids", [])),  # as CT2's converter wrote them
        "suppress_tokens": list(ct2_config.get("suppress_ids", [])),
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin", [])),
        "alignment_heads": [list(map(int, h)) for h in ct2_config.get("alignment_heads", [])],
        "max_initial_timestamp_index": 50,  # first timestamp <= 1.00 s, as openai-whisper
        "max_length": None,  # filled in below from the decoder's positions
    }


def load_ctranslate2_whisper(
    folder: str | Path, dtype: torch.dtype | None = None
) -> tuple[WhisperConfig, dict[str, torch.Tensor], dict]:
    """Read a CTranslate2 Whisper folder as Hugging Face pieces.

    Args:
        folder: directory with model.bin, config.json and (normally) tokenizer.json.
        dtype: cast every weight to this dtype; None keeps the stored float dtype
            (int8/int16 weights are dequantized to the dtype of the model's other floats).

    Returns:
        (config, state_dict, generation_info): a `transformers.WhisperConfig`; a state dict for
        `WhisperForConditionalGeneration` (HF names, `proj_out.weight` is the token embedding);
        decoding hints (suppress_tokens, begin_suppress_tokens, lang_to_id, lang_ids,
        is_multilingual, alignment_heads, decoder_start_token_id, eos/no_timestamps ids, ...).
    """
    from transformers import WhisperConfig  # slow import, only needed here

    folder = Path(folder)
    bin_path = folder / "model.bin"
    if not bin_path.is_file():
        raise FileNotFoundError(f"{folder} is not a CTranslate2 model folder: no model.bin")
    config_path = folder / "config.json"
    ct2_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    model = read_ct2_model_bin(bin_path)
    state_dict, n_enc, n_dec = ct2_whisper_to_hf_state_dict(model, dtype)

    vocab_size, d_model = state_dict["model.decoder.embed_tokens.weight"].shape
    info = _generation_info(folder, ct2_config, vocab_size)
    max_target = state_dict["model.decoder.embed_positions.weight"].shape[0]
    info["max_length"] = max_target
    config = WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=state_dict["model.encoder.conv1.weight"].shape[1],
        d_model=d_model,
        encoder_layers=n_enc,
        decoder_layers=n_dec,
        encoder_attention_heads=_heads(model, "encoder", d_model),
        decoder_attention_heads=_heads(model, "decoder", d_model),
        encoder_ffn_dim=state_dict["model.encoder.layers.0.fc1.weight"].shape[0],
        decoder_ffn_dim=state_dict["model.decoder.layers.0.fc1.weight"].shape[0],
        max_source_positions=state_dict["model.encoder.embed_positions.weight"].shape[0],
        max_target_positions=max_target,
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=model.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight",
        decoder_start_token_id=info["decoder_start_token_id"],
        bos_token_id=info["bos_token_id"],
        eos_token_id=info["eos_token_id"],
        pad_token_id=info["pad_token_id"],
        suppress_tokens=info["suppress_tokens"],
        begin_suppress_tokens=info["begin_suppress_tokens"],
    )
    return config, state_dict, info
