"""Whisper: our engine vs transformers' generate on random-weight models (fp32, CPU)."""

import pytest
import torch
import transformers

from encdec_cli.engine import Engine, Request, SamplingParams
from tests.whisper_models import EOT, SOT, load_ours, random_whisper

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


def test_seeded_sampling_is_reproducible(tmp_path):
    random_whisper(tmp_path)
    engine = Engine(load_ours(tmp_path), num_blocks=800, block_size=4)
    f = torch.randn(80, 3000)
    p = SamplingParams(max_new_tokens=15, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    a = [r.token_ids for r in engine.generate([Request(f, [SOT], p, 0)])]
    b = [r.token_ids for r in engine.generate([Request(f, [SOT], p, 0)])]
    greedy = [r.token_ids for r in engine.generate([Request(f, [SOT], SamplingParams(max_new_tokens=15), 0)])]
    assert a == b and a != greedy
