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
from encdec_models.layers import masked_group_norm
from encdec_models.loading import load_model
from encdec_models.moonshine import MIN_SAMPLES, encoder_frames
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


def test_batched_front_end_equals_each_clip_alone(clips, tmp_path):
    """Clips of different lengths in one encoder batch (grouped by length, each group zero-padded,
    the GroupNorm masked to each clip's own frames, the frames put back in the items' order) give
    each clip the encoder output of a batch of that clip alone, and transformers' encoder output on
    the clip (fp32)."""
    hf = _build(tmp_path, False)
    model = load_model(tmp_path, device="cpu").model
    waves = [clips[1], clips[0], clips[3], clips[2][:MIN_SAMPLES], clips[2]]
    assert len({len(w) for w in waves}) == len(waves)
    with torch.no_grad():
        batch = model.prepare_encoder_batch(waves, "cpu")
        groups = batch.front_end_groups  # longest first, each clip at least half its group's first
        assert [(r, w) for r, w, _ in groups] == [(3, len(clips[3])), (1, len(clips[0])), (1, MIN_SAMPLES)]
        assert batch.inputs.numel() == sum(r * w for r, w, _ in groups) <= 2 * sum(len(w) for w in waves)
        assert batch.pack_order is not None  # the groups' order is not the items'
        together = model.encode(batch)
        frames = [encoder_frames(len(w)) for w in waves]
        assert together.shape[0] == sum(frames) and batch.max_seqlen == max(frames)
        alone = [model.encode(model.prepare_encoder_batch([w], "cpu")) for w in waves]
        theirs = [hf.model.encoder(torch.from_numpy(w)[None]).last_hidden_state[0] for w in waves]
    for got, one, ref in zip(together.split(frames), alone, theirs, strict=True):
        torch.testing.assert_close(got, one, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("groups", "offset"), [(1, 1.0), (4, 1.0), (1, 300.0)])
def test_masked_group_norm_is_group_norm_of_each_item(groups, offset):
    """Against a float64 GroupNorm of each item alone; also far from zero (offset 300, spread 3),
    where sums of squares taken around zero would cancel."""
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(groups, 8, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    lengths = [7, 19, 1, 12]
    x = torch.randn(len(lengths), 8, max(lengths)) * 3 + offset
    got = masked_group_norm(x, torch.tensor(lengths), norm)
    assert torch.isfinite(got).all()
    for i, n in enumerate(lengths):
        ref = norm.double()(x[i : i + 1, :, :n].double())[0].float()  # exact to float32's resolution
        torch.testing.assert_close(got[i, :, :n], ref, rtol=1e-5, atol=1e-5)
