"""Pipeline parallelism on GPUs: 2 stages over NCCL (needs 2 CUDA devices) give the greedy and
4-beam tokens of one process (float32), on a random Whisper in both cross-attention layouts, with
the model's dtype or fp8 (the Triton store kernels quantizing in every stage) in the KV cache."""

from __future__ import annotations

import pytest
import torch

from encdec_cli.engine import Engine, Request, SamplingParams
from tests.support.whisper_models import EOT, SOT, random_whisper

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("absorb", [False, True])
def test_two_gpu_stages_give_the_tokens_of_one_gpu(tmp_path, absorb, kv_dtype):
    random_whisper(tmp_path, d_model=128, encoder_attention_heads=2, decoder_attention_heads=2,
                   encoder_layers=3, decoder_layers=3)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(80, 3000, generator=g) for _ in range(12)]

    def run(**cfg):
        engine = Engine(str(tmp_path), device="cuda:0", dtype="float32", absorb_cross=absorb,
                        kv_dtype=kv_dtype, **cfg)  # fmt: skip
        try:
            assert engine.kv_dtype_name == ("fp8_e4m3" if kv_dtype == "fp8" else "float32")
            out = {}
            for beams in (1, 4):
                params = SamplingParams(max_new_tokens=32, num_beams=beams, stop_token_ids=[EOT])
                reqs = [Request(f, [SOT], params, i) for i, f in enumerate(feats)]
                out[beams] = {
                    r.request_id: [c.token_ids for c in r.completions] for r in engine.generate(reqs)
                }
            return out, engine.stats
        finally:
            engine.close()

    want, _ = run(enforce_eager=True)
    got, stats = run(pipeline_parallel=2)
    assert got == want
    assert len(stats.stage_busy_seconds) == 2


def test_two_gpu_stages_rotary_widths_and_speculative(tmp_path):
    """T5Gemma with an encoder wider than its decoder (rotary positions, both widths over NCCL),
    with and without n-gram speculative decoding: the greedy tokens of one GPU."""
    from tests.models.test_parity_t5gemma import BOS, EOS, _build, _inputs

    _build(tmp_path, "full-wide-encoder")
    params = SamplingParams(max_new_tokens=16, stop_token_ids=(EOS,))
    inputs = _inputs(6, 1) * 2  # duplicates: prefix-cache hits across the stages too

    def run(**cfg):
        engine = Engine(str(tmp_path), device="cuda:0", dtype="float32", **cfg)
        try:
            out = {r.request_id: r.token_ids for r in engine.generate(
                Request(ids, [BOS], params, i) for i, ids in enumerate(inputs))}  # fmt: skip
            return out, engine.stats
        finally:
            engine.close()

    want, _ = run(enforce_eager=True)
    got, stats = run(pipeline_parallel=2)
    assert got == want and stats.prefix_cache_hits > 0
    got, stats = run(pipeline_parallel=2, speculative="ngram:3")
    assert got == want and stats.verify_steps > 0
