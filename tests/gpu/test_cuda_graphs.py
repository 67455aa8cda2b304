"""CUDA-graph decode steps give the same tokens as eager steps (GPU only)."""

from __future__ import annotations

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig

from encdec_cli.engine import Engine, Request, SamplingParams, cuda_graphs
from encdec_cli.engine.cuda_graphs import graph_batch_sizes
from encdec_models.loading import LoadedModel, build_model
from tests.support.whisper_models import EOT, SOT, discriminating_init_, load_ours, random_whisper

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _tokens(loaded, reqs, **cfg):
    engine = Engine(loaded, **cfg)
    assert (engine.runner.graphs is None) == cfg.get("enforce_eager", False)
    out = {r.request_id: r.token_ids for r in engine.generate(reqs)}
    assert engine.blocks.num_free == engine.blocks.num_blocks
    return out, engine


def test_graph_sizes():
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(256)[-1] == 256 and graph_batch_sizes(1) == [1]


def test_whisper_graphs_match_eager_for_every_batch_size(tmp_path, monkeypatch):
    """Graphs (steps launched one ahead, EngineConfig.lookahead; batch sizes up to 8 on one-piece
    graphs there) against plain eager steps."""
    monkeypatch.setattr(cuda_graphs, "WHOLE_AHEAD", 8)
    random_whisper(tmp_path, d_model=128, encoder_attention_heads=2, decoder_attention_heads=2)
    loaded = load_ours(tmp_path)
    loaded.model.cuda()
    g = torch.Generator().manual_seed(0)
    # staggered lengths: as requests finish, the running batch passes through every size
    reqs = [
        Request(
            torch.randn(80, 3000, generator=g),
            [SOT],
            SamplingParams(max_new_tokens=3 + 2 * i, min_new_tokens=3 + 2 * i, stop_token_ids=(EOT,)),
            i,
        )
        for i in range(20)
    ]
    eager, _ = _tokens(loaded, reqs, num_blocks=4000, max_num_seqs=20, enforce_eager=True, lookahead=False)
    graphs, engine = _tokens(loaded, reqs, num_blocks=4000, max_num_seqs=20)
    assert graphs == eager and engine.stats.ahead_steps > 0  # graphs replayed one step ahead
    # the small batch sizes' steps launched ahead ran on one-piece graphs (the others: segments)
    cg = engine.runner.graphs
    assert len(cg.graphs[20]) > 1 and sorted(cg.whole) == [1, 2, 4, 8]
    assert all(len(g) == 1 for g in cg.whole.values()) and 0 < cg.whole_replays < cg.replays
    # without look-ahead no step is launched ahead: no one-piece graphs captured, same tokens
    unahead, unahead_engine = _tokens(loaded, reqs[:4], num_blocks=4000, max_num_seqs=20, lookahead=False)
    assert not unahead_engine.runner.graphs.whole and unahead == {i: eager[i] for i in range(4)}
    # every batch size's graph writes its logits into one buffer (not one [b, vocab] tensor each)
    outputs = engine.runner.graphs.outputs
    assert len(outputs) == len(graph_batch_sizes(20))
    assert len({o.untyped_storage().data_ptr() for o in outputs.values()}) == 1
    assert all(o.data_ptr() == outputs[20].data_ptr() and len(o) == b for b, o in outputs.items())
    # preemption and recompute with graphs on: same tokens (pool: 3 cross caches, few output blocks)
    same = [
        Request(
            r.encoder_input,
            [SOT],
            SamplingParams(max_new_tokens=40, min_new_tokens=40, stop_token_ids=(EOT,)),
            r.request_id,
        )
        for r in reqs[:8]
    ]
    plain = dict(enforce_eager=True, lookahead=False)
    eager, _ = _tokens(loaded, same, num_blocks=4000, block_size=4, max_num_seqs=8, **plain)
    small, engine = _tokens(loaded, same, num_blocks=3 * 375 + 20, block_size=4, max_num_seqs=8)
    assert engine.scheduler.num_preemptions > 0 and small == eager


def test_bart_mixed_cross_lengths_and_arrivals(tmp_path):
    cfg = BartConfig(
        vocab_size=300,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=512,
        architectures=["BartForConditionalGeneration"],
    )
    hf = BartForConditionalGeneration(cfg).eval()
    discriminating_init_(hf)
    model = build_model(
        "BartForConditionalGeneration", cfg, hf.state_dict().items(), torch.device("cuda"), torch.float32
    )
    loaded = LoadedModel(model, None, cfg, GenerationConfig(), "BartForConditionalGeneration", tmp_path)
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(3, 400, (40,), generator=g).tolist()
    reqs = [
        Request(
            torch.randint(4, 299, (n,), generator=g).tolist(),
            [2],
            SamplingParams(max_new_tokens=30, stop_token_ids=(2,)),
            i,
        )
        for i, n in enumerate(lens)
    ]

    def trickle():  # requests arrive while others run: the source is not ready every time it is asked
        for i, r in enumerate(reqs):
            if i % 3 == 0:
                yield None
            yield r

    eager, _ = _tokens(loaded, reqs, num_blocks=3000, max_num_seqs=16, enforce_eager=True, lookahead=False)
    graphs, engine = _tokens(loaded, trickle(), num_blocks=3000, max_num_seqs=16)
    assert graphs == eager and engine.stats.ahead_steps > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_item_encoder_graph_matches_eager(tmp_path, monkeypatch, dtype):
    """Waveforms encoded one at a time replay the captured encoder graph (cross K/V written into
    each request's own blocks); a log-mel input, another shape, runs eager. Same tokens as an
    engine without graphs. In bfloat16 on Hopper the graph holds the Gluon encoder attention
    (encdec_kernels/flash_hopper.py: TMA descriptors captured as kernel parameters)."""
    random_whisper(tmp_path, d_model=128, encoder_attention_heads=2, decoder_attention_heads=2)
    loaded = load_ours(tmp_path, dtype=dtype)
    loaded.model.cuda()
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(16000 * n, generator=g).numpy() * 0.1 for n in (30, 7, 19)]
    inputs.insert(2, torch.randn(80, 3000, generator=g))
    reqs = [
        Request(x, [SOT], SamplingParams(max_new_tokens=12, min_new_tokens=12, stop_token_ids=(EOT,)), i)
        for i, x in enumerate(inputs)
    ]
    from encdec_kernels import flash_hopper

    calls = []
    real = flash_hopper.flash_attention
    monkeypatch.setattr(flash_hopper, "flash_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    eager, _ = _tokens(loaded, reqs, num_blocks=4000, max_num_seqs=1, enforce_eager=True, lookahead=False)
    graphs, engine = _tokens(loaded, reqs, num_blocks=4000, max_num_seqs=1)
    hopper = torch.cuda.get_device_capability()[0] == 9 and flash_hopper.AVAILABLE
    assert bool(calls) == (hopper and dtype == torch.bfloat16)  # eager runs and the graph capture
    assert engine.runner.encoder_graph is not None
    assert engine.runner.encoder_graph_replays == 3  # the three waveforms; the log-mel ran eager
    assert graphs == eager
