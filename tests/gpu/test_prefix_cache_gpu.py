"""Automatic prefix caching on CUDA: with CUDA graphs, look-ahead steps and both cross-attention
layouts, the cache on gives the tokens of the cache off (float32), on inputs with duplicates and
windows decoded again (a temperature fallback), also when a small pool evicts; the encoder output
read back from the absorbed cross cache is the encoder's own."""

from __future__ import annotations

import pytest
import torch

from encdec_cli.engine import Engine, Request, SamplingParams
from tests.support.whisper_models import EOT, SOT, load_ours, random_whisper

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def whisper_cuda(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefix-gpu")
    random_whisper(path, d_model=128, encoder_attention_heads=2, decoder_attention_heads=2)
    loaded = load_ours(path, dtype=torch.float32)
    loaded.model.cuda()
    return loaded


def requests(n_unique=12):
    """Greedy windows (log-mel on the host), a third of them again as new tensors with the same
    values, then every window decoded again, sampled with a seed and a 21-token prompt (a fallback
    with a previous-text prompt), and at the end a second such candidate per window (shares the
    first one's full prompt block)."""
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(80, 3000, generator=g) for _ in range(n_unique)]
    greedy = SamplingParams(max_new_tokens=24, stop_token_ids=(EOT,))
    reqs = [Request(f, [SOT], greedy, ("g", i)) for i, f in enumerate(feats)]
    reqs += [Request(feats[i].clone(), [SOT], greedy, ("copy", i)) for i in range(0, n_unique, 3)]
    prompt = [SOT, *range(10, 30)]
    for i, f in enumerate(feats):
        p = SamplingParams(max_new_tokens=16, stop_token_ids=(EOT,), temperature=0.7, seed=i)
        reqs.append(Request(f, prompt, p, ("fallback", i)))
    for i, f in enumerate(feats):
        p = SamplingParams(max_new_tokens=16, stop_token_ids=(EOT,), temperature=0.7, seed=100 + i)
        reqs.append(Request(f, prompt, p, ("second", i)))
    return reqs


def run(loaded, reqs, **cfg):
    engine = Engine(loaded, **cfg)
    out = {r.request_id: (r.token_ids, r.error) for r in engine.generate(reqs)}
    assert engine.num_free_blocks == engine.num_blocks  # nothing leaked (cached blocks count as free)
    return engine, out


@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "kv"])
@pytest.mark.parametrize("small", [False, True], ids=["large-pool", "small-pool"])
def test_cache_on_off_identical_with_graphs(whisper_cuda, absorb, small):
    reqs = requests()
    # a request's cross blocks: 24 absorbed (64 encoder rows a block), 94 per-layer K/V; a small
    # pool holds about 6 requests and evicts all along
    num_blocks = (150 if absorb else 600) if small else 4000
    cfg = dict(block_size=16, num_blocks=num_blocks, max_num_seqs=16, absorb_cross=absorb)
    off_engine, off = run(whisper_cuda, reqs, prefix_cache=False, **cfg)
    on_engine, on = run(whisper_cuda, reqs, **cfg)
    assert on == off and all(err is None for _, err in on.values())
    assert on_engine.uses_cuda_graphs and on_engine.absorbs_cross == absorb
    stats = on_engine.stats
    assert stats.prefix_cache_misses >= 12 and stats.ahead_steps > 0
    if small:
        assert stats.prefix_cache_evictions > 0 and stats.prefix_cache_hits > 0
    else:
        assert stats.prefix_cache_misses == 12 and stats.prefix_cache_hits == 4 + 12 + 12
        assert stats.prefix_cache_prompt_tokens > 0


def test_float32_encoder_output_does_not_depend_on_the_batch(whisper_cuda):
    """A window's float32 encoder output alone and among others in one encoder batch: equal up to
    float32 rounding (cuDNN's convolutions in full float32, ``exact_fp32_convolutions``; with
    torch's default TF32 they differed by up to 4e-3, enough to change a sampled token when a
    cached encoder output from another batch stood in for a fresh one)."""
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(80, 3000, generator=g) for _ in range(12)]
    model = whisper_cuda.model
    with torch.inference_mode():
        alone = model.encode(model.prepare_encoder_batch([feats[2]], "cuda"))
        for n in (3, 5, 12):
            together = model.encode(model.prepare_encoder_batch(feats[:n], "cuda")).view(n, 1500, -1)
            torch.testing.assert_close(together[2], alone, rtol=1e-5, atol=1e-5)


def test_cached_encoder_output_is_the_encoders(whisper_cuda):
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(80, 3000, generator=g) for _ in range(3)]
    engine = Engine(whisper_cuda, block_size=16, num_blocks=2000, max_num_seqs=16, absorb_cross=True)
    params = SamplingParams(max_new_tokens=4, stop_token_ids=(EOT,))
    list(engine.generate([Request(f, [SOT], params, i) for i, f in enumerate(feats)]))
    model = whisper_cuda.model
    with torch.inference_mode():
        want = model.encode(model.prepare_encoder_batch(feats, "cuda")).view(3, 1500, -1)
    for f, w in zip(feats, want):
        got = engine.cached_encoder_output(f.clone())
        assert got is not None and got.shape == w.shape
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)
    assert engine.cached_encoder_output(torch.randn(80, 3000)) is None
    kv = Engine(whisper_cuda, block_size=16, num_blocks=2000, max_num_seqs=16, absorb_cross=False)
    list(kv.generate([Request(feats[0], [SOT], params, 0)]))
    assert kv.cached_encoder_output(feats[0]) is None  # per-layer K/V: the encoder output is not kept
