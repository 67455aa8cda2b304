"""The issue-24 models on CUDA (float32): NLLB (Triton kernels, CUDA graphs), Moonshine (Triton
kernels, raw-waveform encoder), T5Gemma (sliding windows and
soft-capping: the reference attention, eager) and T5Gemma 2 (merged attention: the reference,
eager) give transformers' greedy tokens, as on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import M2M100ForConditionalGeneration

from encdec_cli.engine import Engine, Request, SamplingParams
from encdec_models.loading import load_model
from tests.support.translation_models import build_translation_model, sentence

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_nllb_on_cuda_matches_transformers(tmp_path):
    import random

    model = build_translation_model("nllb", tmp_path)
    tok = model.tokenizer("eng_Latn")
    lang = model.lang_id("fra_Latn")
    texts = [sentence(random.Random(i)) for i in range(16)]
    hf = M2M100ForConditionalGeneration.from_pretrained(model.path).eval()
    expected = []
    with torch.no_grad():
        for t in texts:
            out = hf.generate(
                tok(t, return_tensors="pt").input_ids, forced_bos_token_id=lang, max_new_tokens=20
            )
            row = out[0, 1:].tolist()
            expected.append(row[: row.index(2)] if 2 in row else row)
    engine = Engine(load_model(model.path, device="cuda", dtype="float32"), max_num_seqs=8)
    assert engine.uses_cuda_graphs
    params = SamplingParams(max_new_tokens=20, stop_token_ids=(2,), forced_tokens=((0, lang),))
    got = {
        r.request_id: r.token_ids
        for r in engine.generate(Request(tok(t).input_ids, [2], params, i) for i, t in enumerate(texts))
    }
    assert [got[i] for i in range(len(texts))] == expected


def test_moonshine_on_cuda_matches_transformers(tmp_path):
    from tests.models.test_parity_moonshine import EOT, SOT, _build

    hf = _build(tmp_path, tied=False)
    g = np.random.default_rng(0)
    waves = [(g.standard_normal(n) * 0.1).astype(np.float32) for n in (16000, 48000, 80000, 33333)]
    expected = []
    with torch.no_grad():
        for w in waves:
            out = hf.generate(torch.from_numpy(w)[None], max_new_tokens=20, do_sample=False)[0].tolist()
            out = out[1:] if out[0] == SOT else out
            expected.append(out[: out.index(EOT)] if EOT in out else out)
    engine = Engine(load_model(tmp_path, device="cuda", dtype="float32"), max_num_seqs=4)
    params = SamplingParams(max_new_tokens=20, stop_token_ids=(EOT,))
    got = {
        r.request_id: r.token_ids
        for r in engine.generate(Request(w, [SOT], params, i) for i, w in enumerate(waves))
    }
    assert [got[i] for i in range(len(waves))] == expected


def test_moonshine_batched_front_end_on_cuda_bf16(tmp_path):
    """bf16 on CUDA, clips of different lengths in one encoder batch (three length groups): the
    batched front end (masked GroupNorm, packing, back to the items' order) launches without a host
    sync, and each clip's encoder output matches a batch of that clip alone to bf16's precision."""
    from tests.models.test_parity_moonshine import _build

    _build(tmp_path, tied=False)
    model = load_model(tmp_path, device="cuda", dtype="bfloat16").model
    g = np.random.default_rng(1)
    waves = [(g.standard_normal(n) * 0.1).astype(np.float32) for n in (160000, 16000, 97531, 48000)]
    with torch.inference_mode():
        batch = model.prepare_encoder_batch(waves, "cuda")
        assert len(batch.front_end_groups) == 3 and batch.pack_order is not None
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model.packed_frames(batch)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        together = model.encode(batch).float()
        lens = [int(n) for n in (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()]
        for got, w in zip(together.split(lens), waves, strict=True):
            alone = model.encode(model.prepare_encoder_batch([w], "cuda")).float()
            assert got.shape == alone.shape
            assert ((got - alone).norm() / alone.norm()).item() < 2e-2


def test_t5gemma_on_cuda_runs_eager_on_the_reference_attention(tmp_path):
    from tests.models.test_parity_t5gemma import BOS, EOS, _build, _hf, _inputs

    hf = _build(tmp_path, "sliding")
    inputs = _inputs(6, 1)
    expected = [_hf(hf, ids) for ids in inputs]
    engine = Engine(load_model(tmp_path, device="cuda", dtype="float32"), max_num_seqs=4)
    assert not engine.uses_cuda_graphs  # sliding windows / soft-capping: reference attention, eager
    params = SamplingParams(max_new_tokens=16, stop_token_ids=(EOS,))
    got = {
        r.request_id: r.token_ids
        for r in engine.generate(Request(x, [BOS], params, i) for i, x in enumerate(inputs))
    }
    assert [got[i] for i in range(len(inputs))] == expected


def test_t5gemma2_on_cuda_matches_transformers(tmp_path):
    """T5Gemma 2 on CUDA: merged attention (the Triton paged kernel's log-sum-exp and causal window),
    eager and in CUDA graphs, images through SigLIP: transformers' greedy tokens.
    Skipped where the installed transformers has no T5Gemma 2 (the reference)."""
    import transformers

    if not hasattr(transformers, "T5Gemma2ForConditionalGeneration"):
        pytest.skip("the installed transformers has no T5Gemma 2")
    from tests.models.test_parity_t5gemma2 import GREEDY, _build, _hf, _hf_image, _image_inputs, _inputs, _run

    hf = _build(tmp_path)
    inputs = _inputs(6, 1) + _image_inputs(3, 11)  # text, and images through the SigLIP tower
    expected = [_hf_image(hf, x) if isinstance(x, dict) else _hf(hf, x) for x in inputs]
    loaded = load_model(tmp_path, device="cuda", dtype="float32")
    engine = Engine(loaded, max_num_seqs=4, enforce_eager=True)
    assert not engine.uses_cuda_graphs
    assert _run(engine, inputs, GREEDY) == expected
    engine.close()  # its pool took the memory the next engine sizes its own from
    # the decode steps are all kernels (causal windows, log-sum-exp): captured in CUDA graphs by
    # default, the same tokens
    graphs = Engine(loaded, max_num_seqs=4)
    assert graphs.uses_cuda_graphs
    assert _run(graphs, inputs, GREEDY) == expected
    graphs.close()
    bf16 = Engine(load_model(tmp_path, device="cuda", dtype="bfloat16"), max_num_seqs=4)
    assert all(len(out) > 0 for out in _run(bf16, inputs, GREEDY))  # runs in bfloat16 (tokens may differ)
