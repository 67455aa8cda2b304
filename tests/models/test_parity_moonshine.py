"""Moonshine on the shared layers: raw waveforms of different lengths (espeak speech, no padding)
through the packed variable-length encoder, greedy tokens identical to transformers' generate on
the same random weights (fp32, CPU): interleaved partial rotary positions,
bias-free LayerNorms, the gated SiLU decoder MLP, a tied and an untied output projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import MoonshineConfig, MoonshineForConditionalGeneration

from encdec_cli.engine import Engine, Request, SamplingParams
from encdec_models.loading import load_model
from encdec_models.moonshine import encoder_frames
from tests.support import transcribe_clips
from tests.support.text_models import single_thread
from tests.support.whisper_models import discriminating_init_

SOT, EOT = 1, 2
MAX_NEW = 20


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    if not transcribe_clips.have_espeak():
        pytest.skip("espeak-ng not installed")
    texts = ["hello world", "the quick brown fox jumps over the lazy dog", "one two three four five six"]
    out = [transcribe_clips.speak(t) for t in texts]
    out.append(np.concatenate([out[0], np.zeros(8000, np.float32), out[2]]))  # a pause inside
    return out


def _build(path, tied: bool) -> MoonshineForConditionalGeneration:
    cfg = MoonshineConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, encoder_num_hidden_layers=2,
        decoder_num_hidden_layers=2, encoder_num_attention_heads=4, decoder_num_attention_heads=4,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        decoder_start_token_id=SOT, bos_token_id=SOT, eos_token_id=EOT, pad_token_id=0,
        tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MoonshineForConditionalGeneration(cfg).eval()
    discriminating_init_(model)
    with torch.no_grad():
        model.model.encoder.conv1.weight.mul_(20.0)  # speech-scale samples (~0.1) reach the tanh range
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_greedy_parity_on_speech(clips, tied, tmp_path):
    hf = _build(tmp_path, tied)
    expected = []
    with torch.no_grad():
        for wave in clips:  # one at a time: transformers' GroupNorm would see a padded batch's zeros
            out = hf.generate(torch.from_numpy(wave)[None], max_new_tokens=MAX_NEW, do_sample=False)[
                0
            ].tolist()
            out = out[1:] if out[0] == SOT else out
            expected.append(out[: out.index(EOT)] if EOT in out else out)
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.architecture == "MoonshineForConditionalGeneration"
    assert [loaded.model.encoder_length(w) for w in clips] == [encoder_frames(len(w)) for w in clips]
    engine = Engine(loaded, num_blocks=120, block_size=4, max_num_seqs=3)
    params = SamplingParams(max_new_tokens=MAX_NEW, stop_token_ids=(EOT,))
    got = {
        r.request_id: r for r in engine.generate(Request(w, [SOT], params, i) for i, w in enumerate(clips))
    }
    assert all(r.error is None for r in got.values()), [r.error for r in got.values()]
    assert [got[i].token_ids for i in range(len(clips))] == expected
    assert len({tuple(e) for e in expected}) == len(expected) and all(len(set(e)) > 3 for e in expected)
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_bad_audio_fails_alone(tmp_path, clips):
    _build(tmp_path, False)
    engine = Engine(load_model(tmp_path, device="cpu"), num_blocks=120, block_size=4)
    params = SamplingParams(max_new_tokens=3, stop_token_ids=(EOT,))
    items = {"ok": clips[0], "short": np.zeros(100, np.float32), "2-D": np.zeros((2, 5000), np.float32)}
    got = {r.request_id: r for r in engine.generate(Request(x, [SOT], params, k) for k, x in items.items())}
    assert got["ok"].error is None
    assert "too short" in got["short"].error and "1-D array" in got["2-D"].error
