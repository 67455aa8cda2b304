"""Pipeline parallelism on GPUs: 2 stages over NCCL (needs 2 CUDA devices) give the greedy and
4-beam tokens of one process (float32), on a random Whisper in both cross-attention layouts, with
the model's dtype or fp8 (the Triton store kernels quantizing in every stage) in the KV cache."""

from __future__ import annotations

import pytest
import torch

from encdec_cli.engine import Engine, Request, SamplingParams
from tests.support.whisper_models import EOT, SOT, random_whisper

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


@two_gpus
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
            replays = (
                [s["replays"] for s in engine.runner.stage_stats()] if "pipeline_parallel" in cfg else []
            )
            return out, engine.stats, replays
        finally:
            engine.close()

    want, _, _ = run(enforce_eager=True)
    got, stats, replays = run(pipeline_parallel=2)
    assert got == want
    assert len(stats.stage_busy_seconds) == 2
    assert all(r > 0 for r in replays), replays  # both stages ran decode steps on their CUDA graphs


@pytest.mark.parametrize("beams", [1, 4])
def test_stage_graphs_on_one_gpu(tmp_path, monkeypatch, beams):
    """Per-stage CUDA graphs where one GPU is all there is: 2 and 3 stages on cuda:0
    (``ENCDEC_TEST_STAGES_ON_ONE_GPU``: activations over gloo through host memory) give the tokens
    of one process (float32, graphs off), every decoder stage replaying its graphs; 13 requests,
    so micro-batches are padded to the captured sizes."""
    random_whisper(tmp_path, d_model=128, encoder_attention_heads=2, decoder_attention_heads=2,
                   encoder_layers=2, decoder_layers=3)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(80, 3000, generator=g) for _ in range(13)]
    params = SamplingParams(max_new_tokens=32, num_beams=beams, stop_token_ids=[EOT])

    def run(**cfg):
        # a fixed pool: stages sharing one GPU would each size theirs from the same free memory
        engine = Engine(
            str(tmp_path), device="cuda:0", dtype="float32", max_num_seqs=32, num_blocks=4000, **cfg
        )
        try:
            reqs = [Request(f, [SOT], params, i) for i, f in enumerate(feats)]
            out = {r.request_id: [c.token_ids for c in r.completions] for r in engine.generate(reqs)}
            if "pipeline_parallel" not in cfg:
                return out, None
            plans = engine.runner.plans
            return out, [s["replays"] for s, p in zip(engine.runner.stage_stats(), plans) if p.has_decoder]
        finally:
            engine.close()

    want, _ = run(enforce_eager=True)
    monkeypatch.setenv("ENCDEC_TEST_STAGES_ON_ONE_GPU", "1")
    for stages, layers in ((2, None), (3, (1, 2, 2))):
        got, replays = run(pipeline_parallel=stages, pp_layers=layers)
        assert got == want, f"{stages} stages"
        assert replays and all(r > 0 for r in replays), replays


@two_gpus
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
