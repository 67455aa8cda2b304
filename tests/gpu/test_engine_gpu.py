"""End to end on CUDA: Triton kernels vs the reference path give the same greedy tokens
(float32: identical; bfloat16: >= 99% identical), for Whisper and the text families."""

from __future__ import annotations

import os

import pytest
import torch

from encdec_cli.engine import Engine, Request, SamplingParams
from tests.support.whisper_models import EOT, SOT, load_ours, random_whisper

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _run(loaded, requests, kernels: str, **cfg):
    os.environ["ENCDEC_KERNELS"] = kernels
    try:
        engine = Engine(loaded, **cfg)
        out = {r.request_id: r.token_ids for r in engine.generate(requests)}
        assert engine.blocks.num_free == engine.blocks.num_blocks
        return out
    finally:
        os.environ.pop("ENCDEC_KERNELS", None)


def _random_whisper_requests(tmp_path, dtype, n, params):
    """A random 2-head Whisper (d_model 128) on the GPU and n requests of random features with
    prompts of 1-3 tokens."""
    random_whisper(tmp_path, d_model=128, encoder_attention_heads=2, decoder_attention_heads=2)
    loaded = load_ours(tmp_path, dtype=dtype)
    loaded.model.cuda()
    g = torch.Generator().manual_seed(0)
    reqs = [
        Request(torch.randn(80, 3000, generator=g), [SOT] + [5 + i] * (i % 3), params, i) for i in range(n)
    ]
    return loaded, reqs


def _agreement(a: dict, b: dict) -> float:
    same = total = 0
    for k in a:
        n = max(len(a[k]), len(b[k]))
        same += sum(x == y for x, y in zip(a[k], b[k]))
        total += n
    return same / max(total, 1)


def test_whisper_triton_matches_reference_fp32(tmp_path):
    # float32 only: this random model is chaotic on purpose (so its outputs depend on every
    # layer), and bf16 rounding then changes later tokens whatever the kernels do; bf16
    # agreement is checked on the trained text models below.
    loaded, reqs = _random_whisper_requests(
        tmp_path, torch.float32, 24, SamplingParams(max_new_tokens=40, stop_token_ids=(EOT,))
    )
    ref = _run(loaded, reqs, "reference", num_blocks=4000, max_num_seqs=8, enforce_eager=True)
    tri = _run(loaded, reqs, "triton", num_blocks=4000, max_num_seqs=8, absorb_cross=False)
    assert tri == ref
    # absorbed cross-attention (float32: the Triton kernel) agrees
    assert _run(loaded, reqs, "triton", num_blocks=4000, max_num_seqs=8, absorb_cross=True) == ref


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["bart", "mbart", "pegasus", "t5", "t5_v1_1"])
def test_text_models_triton_matches_reference(tiny_text_model, name, dtype):
    import random

    from encdec_models.loading import load_model
    from tests.support.text_models import source_ids

    tiny = tiny_text_model(name)
    loaded = load_model(tiny.path, device="cuda", dtype=dtype)
    rng = random.Random(0)
    reqs = []
    for i in range(32):
        words = [f"w{rng.randrange(100)}" for _ in range(rng.randint(1, 14))]
        reqs.append(
            Request(
                source_ids(name, words),
                tiny.prompt_ids,
                SamplingParams(
                    max_new_tokens=20, stop_token_ids=(tiny.eos_token_id,), forced_tokens=tiny.forced_tokens
                ),
                i,
            )
        )
    ref = _run(loaded, reqs, "reference", num_blocks=2000, max_num_seqs=8, enforce_eager=True)
    # absorbed cross-attention (bf16 on Hopper: encdec_kernels/shared_kv_hopper.py) and per-layer K/V
    tri = _run(loaded, reqs, "triton", num_blocks=2000, max_num_seqs=8, absorb_cross=True)
    kv = _run(loaded, reqs, "triton", num_blocks=2000, max_num_seqs=8, absorb_cross=False)
    if dtype == "float32":
        assert tri == ref == kv
    else:
        assert _agreement(kv, ref) >= 0.99
        # absorbed rounds a different (equivalent) computation in bf16: t5_v1_1 0.987 on an H200
        assert _agreement(tri, ref) >= 0.98


def test_ahead_steps_never_synchronize_the_stream(tiny_text_model):
    """A step launched ahead must not wait for the GPU through a stream synchronisation (a copy
    from pageable memory, .tolist() of a device tensor) before it launches the next step: the
    GPU would idle until then. Rows finish at different lengths (so ahead steps drop rows);
    every ahead step runs with torch's sync debug mode set to "error" up to that launch (a step
    that cannot launch another waits for its tokens on purpose). Tokens equal a run without
    lookahead."""
    from encdec_models.loading import load_model
    from tests.support.text_models import source_ids

    tiny = tiny_text_model("bart")
    loaded = load_model(tiny.path, device="cuda", dtype="float32")
    lengths = [3 + i % 7 for i in range(16)]
    reqs = [
        Request(
            source_ids("bart", [f"w{i}", "w7"]),
            tiny.prompt_ids,
            SamplingParams(max_new_tokens=n, min_new_tokens=n, stop_token_ids=(tiny.eos_token_id,)),
            i,
        )
        for i, n in enumerate(lengths)
    ]
    engine = Engine(loaded, num_blocks=2000, max_num_seqs=16)
    step, can_run_ahead = engine.step, engine._can_run_ahead
    checked = 0

    def checked_step():
        if engine._ahead is None:
            return step()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def checked_can_run_ahead(seqs):
        nonlocal checked
        ahead = can_run_ahead(seqs)
        if ahead:
            checked += torch.cuda.get_sync_debug_mode() == 2  # an ahead step launching the next
        else:
            torch.cuda.set_sync_debug_mode("default")  # this step now waits for its tokens
        return ahead

    engine.step, engine._can_run_ahead = checked_step, checked_can_run_ahead
    out = {r.request_id: r.token_ids for r in engine.generate(reqs)}
    assert checked >= 3
    assert [len(out[i]) for i in range(16)] == lengths
    ref = _run(loaded, reqs, "triton", num_blocks=2000, max_num_seqs=16, lookahead=False)
    assert out == ref


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
    reason="the Gluon encoder attention is for Hopper (sm_90)",
)
def test_whisper_bf16_encoder_on_the_hopper_kernel(tmp_path, monkeypatch):
    """A bf16 Whisper encoder (1500 positions, head dim 64) runs its attention on
    encdec_kernels/flash_hopper.py, and its output matches the encoder on the Triton kernel and on the
    reference path to bf16 accuracy."""
    from encdec_kernels import flash_hopper, gluon_support
    from tests.kernels.cases import rel_err

    random_whisper(tmp_path, d_model=128, encoder_attention_heads=2, decoder_attention_heads=2)
    loaded = load_ours(tmp_path, dtype=torch.bfloat16)
    model = loaded.model.cuda()
    g = torch.Generator().manual_seed(0)
    batch = model.prepare_encoder_batch(
        [torch.randn(16000 * 30, generator=g).numpy() * 0.1 for _ in range(3)], "cuda"
    )
    calls = []
    real = flash_hopper.flash_attention
    monkeypatch.setattr(flash_hopper, "flash_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.inference_mode():
        hopper = model.encode(batch)
        assert len(calls) == 2  # both encoder layers
        monkeypatch.setenv(gluon_support.ENV, "0")
        triton_out = model.encode(batch)
        monkeypatch.setenv("ENCDEC_KERNELS", "reference")
        reference_out = model.encode(batch)
    assert len(calls) == 2
    assert rel_err(triton_out, reference_out) < 1e-2
    assert rel_err(hopper, reference_out) < 1e-2


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
    reason="the Gluon cross-attention kernel is for Hopper (sm_90)",
)
def test_whisper_fp16_absorbed_cross_attention_on_the_hopper_kernel(tmp_path, monkeypatch):
    """An fp16 Whisper engine with absorbed cross-attention runs its steps, CUDA-graphed and eager,
    prompts included, on encdec_kernels/shared_kv_hopper.py, and gives the tokens of the per-layer K/V
    engine (this random model is chaotic: a few tokens each; in bf16 11% of them differ)."""
    from encdec_kernels import shared_kv_hopper

    params = SamplingParams(max_new_tokens=4, min_new_tokens=4, stop_token_ids=(EOT,))
    loaded, reqs = _random_whisper_requests(tmp_path, torch.float16, 40, params)  # bf16: 11% differ
    from encdec_kernels import shared_kv

    steps, hopper = [], []  # max_seqlen_q of every absorbed cross-attention call; Hopper kernel calls
    launch, real = shared_kv._launch_shared_kv, shared_kv_hopper.shared_kv_attention
    monkeypatch.setattr(shared_kv, "_launch_shared_kv", lambda *a, **k: steps.append(a[5]) or launch(*a, **k))
    monkeypatch.setattr(
        shared_kv_hopper, "shared_kv_attention", lambda *a, **k: hopper.append(1) or real(*a, **k)
    )
    absorbed = _run(loaded, reqs, "triton", num_blocks=2000, max_num_seqs=32)
    assert len(hopper) == len(steps) > 0  # every call took the Hopper kernel ...
    assert max(steps) > 1 and min(steps) == 1  # ... prompt steps (several tokens a sequence) included
    kv = _run(loaded, reqs, "triton", num_blocks=4000, max_num_seqs=32, absorb_cross=False)
    assert _agreement(absorbed, kv) >= 0.95
