"""Whisper: our engine vs transformers' generate on random-weight models (fp32, CPU)."""

import re

import numpy as np
import pytest
import torch
import transformers

from encdec_cli.engine import Engine, Request, SamplingParams
from tests.support.whisper_models import EOT, SOT, load_ours, random_whisper

transformers.logging.set_verbosity_error()

SHAPES = {
    "tiny-like": dict(),
    "128-mels-odd-heads": dict(
        num_mel_bins=128,
        d_model=96,
        encoder_attention_heads=3,
        decoder_attention_heads=3,
        encoder_layers=3,
        decoder_layers=1,
        encoder_ffn_dim=64,
        decoder_ffn_dim=200,
    ),
    "deeper-decoder": dict(
        d_model=32,
        encoder_layers=1,
        decoder_layers=4,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        vocab_size=700,
    ),
}


def _hf_greedy(model, feats, prompt, max_new):
    out = model.generate(
        input_features=feats[None],
        decoder_input_ids=torch.tensor([prompt]),
        max_new_tokens=max_new,
        do_sample=False,
        num_beams=1,
    )
    toks = out[0].tolist()
    toks = toks[len(prompt) :] if toks[: len(prompt)] == prompt else toks  # versions differ
    return toks[: toks.index(EOT)] if EOT in toks else toks


@pytest.mark.parametrize("absorb_cross", [False, True], ids=["kv", "absorbed"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_greedy_matches_transformers(tmp_path, shape, absorb_cross):
    """absorbed: cross-attention over the encoder output, K/V projections moved into the query
    and the output (the default on GPUs)."""
    hf = random_whisper(tmp_path, seed=list(SHAPES).index(shape), **SHAPES[shape])  # stable across runs
    n_mels = hf.config.num_mel_bins
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(n_mels, 3000, generator=g) for _ in range(6)]
    prompts = [[SOT], [SOT, 7], [SOT, 9, 4], [SOT], [SOT, 3], [SOT, 11, 12, 13, 14]]
    max_new = [20, 5, 30, 12, 1, 25]
    ref = [_hf_greedy(hf, f, p, m) for f, p, m in zip(feats, prompts, max_new)]
    # the model must discriminate: outputs differ between inputs and are not one repeated token
    long = [r for r in ref if len(r) >= 10]
    assert len({tuple(r) for r in long}) == len(long) and all(len(set(r)) > 3 for r in long)

    engine = Engine(
        load_ours(tmp_path), num_blocks=4 * 375 + 40, block_size=4, max_num_seqs=4, absorb_cross=absorb_cross
    )
    reqs = [
        Request(f, p, SamplingParams(max_new_tokens=m, stop_token_ids=(EOT,)), i)
        for i, (f, p, m) in enumerate(zip(feats, prompts, max_new))
    ]
    out = {r.request_id: r for r in engine.generate(reqs)}
    assert all(r.error is None for r in out.values())
    assert [out[i].token_ids for i in range(len(reqs))] == ref
    assert engine.blocks.num_free == engine.blocks.num_blocks  # nothing leaked


def test_results_independent_of_batch_size_order_and_preemption(tmp_path):
    random_whisper(tmp_path)
    ours = load_ours(tmp_path)
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(80, 3000, generator=g) for _ in range(8)]
    params = SamplingParams(max_new_tokens=40, stop_token_ids=(EOT,))

    def run(order, **cfg):
        engine = Engine(ours, block_size=4, **cfg)
        res = {
            r.request_id: r.token_ids
            for r in engine.generate(Request(feats[i], [SOT], params, i) for i in order)
        }
        assert engine.blocks.num_free == engine.blocks.num_blocks
        return res, engine.scheduler.num_preemptions

    base, _ = run(range(8), num_blocks=2000, max_num_seqs=1)
    assert run(range(8), num_blocks=2000, max_num_seqs=8)[0] == base
    assert run(reversed(range(8)), num_blocks=2000, max_num_seqs=3)[0] == base
    # a pool that holds all cross caches but not all outputs: requests get preempted and recomputed
    res, preemptions = run(range(8), num_blocks=3 * 375 + 20, max_num_seqs=8)
    assert preemptions > 0 and res == base


def test_request_errors_do_not_stop_the_others(tmp_path):
    random_whisper(tmp_path)
    engine = Engine(load_ours(tmp_path), num_blocks=800, block_size=4)
    f = torch.randn(80, 3000)
    reqs = [
        Request(f, [], SamplingParams(), "empty-prompt"),
        Request(f, [SOT], SamplingParams(max_new_tokens=3), "ok"),
        Request(f, [SOT] * 64, SamplingParams(), "too-long"),
    ]
    out = {r.request_id: r for r in engine.generate(reqs)}
    assert "empty decoder prompt" in out["empty-prompt"].error
    assert "no room" in out["too-long"].error
    assert out["ok"].error is None and len(out["ok"].token_ids) <= 3


def test_bad_audio_fails_alone_and_input_kinds_mix(tmp_path):
    """Engine-level bad audio gets an error Result each (the rest runs); a waveform and log-mel
    features batched together give the tokens each gives alone."""
    random_whisper(tmp_path)
    ours = load_ours(tmp_path)
    g = torch.Generator().manual_seed(3)
    wave = (torch.randn(5 * 16000, generator=g) * 0.1).numpy()
    mel = torch.randn(80, 3000, generator=g)
    params = SamplingParams(max_new_tokens=5, stop_token_ids=(EOT,))

    def run(items: dict) -> dict:
        engine = Engine(ours, num_blocks=2000, block_size=4, max_num_seqs=8)
        out = {
            r.request_id: r for r in engine.generate(Request(x, [SOT], params, k) for k, x in items.items())
        }
        assert engine.blocks.num_free == engine.blocks.num_blocks
        return out

    alone = {k: run({k: x})[k].token_ids for k, x in (("wave", wave), ("mel", mel))}
    bad = {
        "2-D audio": (np.zeros((2, 100), np.float32), r"1-D array of numbers .* got shape \[2, 100\]"),
        "short mel": (torch.zeros(80, 10), r"log-mel features must be \[80, 3000\], got \[80, 10\]"),
        "text": ("w1 w2", "audio must be a waveform .* got str"),
        "strings": (["a", "b"], "1-D array of numbers"),
        "40 s": (np.zeros(40 * 16000, np.float32), "40.0 s is longer than one 30 s window"),
        "NaN audio": (np.where(np.arange(16000) == 7, np.nan, 0.0).astype(np.float32), "NaN .* in the audio"),
        "inf list": ([0.0, float("inf"), 0.0], "NaN or infinite values in the audio"),
        "NaN tensor": (torch.full((100,), float("nan")), "in the audio"),
        "inf mel": (torch.full((80, 3000), float("-inf")), "infinite values in the log-mel features"),
    }
    out = run({"wave": wave, "mel": mel, **{k: x for k, (x, _) in bad.items()}})
    assert out["wave"].error is None and out["wave"].token_ids == alone["wave"]
    assert out["mel"].error is None and out["mel"].token_ids == alone["mel"]
    for k, (_, expect) in bad.items():
        assert out[k].error is not None and re.search(expect, out[k].error), (k, out[k].error)


def test_seeded_sampling_is_reproducible(tmp_path):
    random_whisper(tmp_path)
    engine = Engine(load_ours(tmp_path), num_blocks=800, block_size=4)
    f = torch.randn(80, 3000)
    p = SamplingParams(max_new_tokens=15, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    a = [r.token_ids for r in engine.generate([Request(f, [SOT], p, 0)])]
    b = [r.token_ids for r in engine.generate([Request(f, [SOT], p, 0)])]
    greedy = [r.token_ids for r in engine.generate([Request(f, [SOT], SamplingParams(max_new_tokens=15), 0)])]
    assert a == b and a != greedy


def test_waveform_batch_from_every_input_kind(tmp_path):
    """prepare_encoder_batch packs float32 / read-only / int16 arrays, lists and tensors of any
    float dtype into zero-padded 30 s rows holding the same samples, without warnings."""
    import warnings

    random_whisper(tmp_path)
    model = load_ours(tmp_path).model
    rng = np.random.default_rng(0)
    base = [rng.standard_normal(n).astype(np.float32) for n in (16000, 480000, 3)]
    read_only = np.frombuffer(base[0].tobytes(), dtype=np.float32)
    items = [
        base[0],
        read_only,
        base[1],
        base[2].tolist(),
        torch.from_numpy(base[0]).double(),
        np.arange(5, dtype=np.int16),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = model.prepare_encoder_batch(items, "cpu")
    want = np.zeros((len(items), 480000), np.float32)
    for i, x in enumerate([base[0], base[0], base[1], base[2], base[0], np.arange(5, dtype=np.float32)]):
        want[i, : len(x)] = x
    assert torch.equal(batch.inputs, torch.from_numpy(want))
    assert batch.cu_seqlens.tolist() == [1500 * i for i in range(len(items) + 1)]
