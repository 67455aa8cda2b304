"""Beam search whose steps choose their beams on the device and launch the next step ahead
(``beam_launch``'s ``ahead``, ``ModelRunner.decode_children``), on CUDA graphs and the Triton
block-copy kernel: the same hypotheses as the host's beam steps, eager (GPU only)."""

from __future__ import annotations

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig

from encdec_cli.engine import Engine, Request, SamplingParams
from encdec_cli.engine import runner as runner_module
from encdec_models.loading import LoadedModel, build_model
from tests.support.whisper_models import discriminating_init_

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _bart():
    cfg = BartConfig(
        vocab_size=300, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=512,
        architectures=["BartForConditionalGeneration"],
    )  # fmt: skip
    hf = BartForConditionalGeneration(cfg).eval()
    discriminating_init_(hf)
    model = build_model(
        "BartForConditionalGeneration", cfg, hf.state_dict().items(), torch.device("cuda"), torch.float32
    )
    return LoadedModel(model, None, cfg, GenerationConfig(), "BartForConditionalGeneration", None)


def _run(loaded, reqs, **cfg):
    engine = Engine(loaded, block_size=4, max_num_seqs=32, **cfg)
    out = {
        r.request_id: [(c.token_ids, c.finish_reason) for c in r.completions] for r in engine.generate(reqs)
    }
    assert len(out) == len(reqs) and engine.blocks.num_free == engine.blocks.num_blocks
    return out, engine


@pytest.mark.parametrize("pool", [4000, 700], ids=["roomy", "preempting"])
def test_beam_steps_ahead_on_graphs_match_host_steps(pool, monkeypatch):
    loaded = _bart()
    g = torch.Generator().manual_seed(2)
    params = SamplingParams(
        num_beams=4, num_return_sequences=2, max_new_tokens=40, stop_token_ids=(2,), length_penalty=1.5,
        no_repeat_ngram_size=3,
    )  # fmt: skip
    reqs = [
        Request(torch.randint(4, 299, (int(n),), generator=g).tolist(), [2], params, i)
        for i, n in enumerate(torch.randint(20, 300, (24,), generator=g))
    ]
    host, _ = _run(loaded, reqs, num_blocks=4000, enforce_eager=True, lookahead=False)
    forks = []
    copy = runner_module.encdec_kernels.copy_blocks_where

    def spy(pool, src, dst, mask):
        forks.append(mask)
        return copy(pool, src, dst, mask)

    monkeypatch.setattr(runner_module.encdec_kernels, "copy_blocks_where", spy)
    ahead, engine = _run(loaded, reqs, num_blocks=pool)
    assert engine.stats.ahead_steps > 0 and engine.runner.graphs.replays > 0
    assert sum(int(m.sum()) for m in forks) > 0  # the Triton kernel copied forked beams' blocks
    if pool < 4000:
        assert engine.scheduler.num_preemptions > 0
    assert ahead == host


def test_beams_and_greedy_requests_coming_and_going_on_graphs_match_eager():
    """Steps whose beams share cross-attention entries and steps with an entry a row (greedy
    requests alone, after the beams ended or before the next ones came) on the same graphs: the
    graphs' entry offsets are rewritten, or kept while they are the identity, never left stale."""
    loaded = _bart()
    g = torch.Generator().manual_seed(5)
    reqs = []
    for i in range(16):
        beams = i % 4 == 3
        params = SamplingParams(
            num_beams=4 if beams else 1, max_new_tokens=int(torch.randint(4, 30, (1,), generator=g)),
            stop_token_ids=(),
        )  # fmt: skip
        reqs.append(Request(torch.randint(4, 299, (int(torch.randint(20, 200, (1,), generator=g)),),
                                          generator=g).tolist(), [2], params, i))  # fmt: skip

    def run(**cfg):
        engine = Engine(loaded, block_size=4, max_num_seqs=10, num_blocks=4000, **cfg)
        out = engine.generate(reqs)
        return engine, {r.request_id: [(c.token_ids, c.finish_reason) for c in r.completions] for r in out}

    _, eager = run(enforce_eager=True, lookahead=False)
    engine, graphed = run()
    assert engine.runner.graphs.grouped and engine.runner.graphs.replays > 0
    assert graphed == eager
