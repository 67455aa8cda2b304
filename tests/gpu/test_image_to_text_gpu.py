"""Image-to-text models on CUDA: the Triton kernels (ViT encoder, Florence-2's BART encoder, the
decoders) against the reference path, for TrOCR-, Donut- and Florence-2-shaped random models, in
both cross-attention layouts: float32, the same greedy tokens; bfloat16, the same first-step
distribution within bf16 rounding and the same first token wherever it is not a near-tie (whole
bf16 outputs of random models part at their many near-ties: on an H100, 4 to 8 of 12 requests
stayed identical to the end)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoImageProcessor, AutoProcessor

from encdec_cli.engine import Engine, Request, SamplingParams
from tests.support.vision_models import (
    BOS,
    EOS,
    draw_images,
    load_ours,
    random_donut,
    random_florence2,
    random_trocr,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _requests(kind: str, path, n: int = 12, vocab: int = 0):
    """``vocab``: record every token's first-step probability (``Result.first_step_probs``)."""
    images = draw_images(n, seed=1)
    params = SamplingParams(
        max_new_tokens=24, stop_token_ids=(EOS,), record_first_step_probs=tuple(range(vocab))
    )
    if kind == "florence2":
        proc = AutoProcessor.from_pretrained(path)
        xs = [proc(text="<OD>", images=im, return_tensors="pt") for im in images]
        inputs = [{"pixel_values": x.pixel_values[0], "input_ids": x.input_ids[0].tolist()} for x in xs]
        return [Request(x, [EOS], params, i) for i, x in enumerate(inputs)]
    proc = AutoImageProcessor.from_pretrained(path)
    pixels = [proc(images=im, return_tensors="pt").pixel_values[0] for im in images]
    return [Request(p, [BOS] + [9] * (i % 3), params, i) for i, p in enumerate(pixels)]


def _run(loaded, requests, kernels: str, **cfg) -> dict:
    os.environ["ENCDEC_KERNELS"] = kernels
    try:
        # the references index with masks (host syncs): they run eagerly, the Triton kernels in graphs
        engine = Engine(loaded, block_size=16, max_num_seqs=8, enforce_eager=kernels == "reference", **cfg)
        out = {r.request_id: r for r in engine.generate(requests)}
        assert all(r.error is None for r in out.values()), [r.error for r in out.values()]
        assert engine.blocks.num_free == engine.blocks.num_blocks
        return {k: (r.token_ids, r.first_step_probs) for k, r in out.items()}
    finally:
        os.environ.pop("ENCDEC_KERNELS", None)


BUILDERS = {"trocr": random_trocr, "donut": random_donut, "florence2": random_florence2}


@pytest.mark.parametrize("absorb_cross", [False, True], ids=["kv", "absorbed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_triton_matches_reference(tmp_path, kind, dtype, absorb_cross):
    BUILDERS[kind](tmp_path)
    loaded = load_ours(tmp_path, dtype=dtype)
    loaded.model.cuda()
    reqs = _requests(kind, tmp_path, vocab=loaded.model.vocab_size if dtype == torch.bfloat16 else 0)
    ref = _run(loaded, reqs, "reference", absorb_cross=absorb_cross)
    got = _run(loaded, reqs, "triton", absorb_cross=absorb_cross)
    if dtype == torch.float32:
        assert got == ref
        return
    clear = 0
    for k, (ref_tokens, ref_probs) in ref.items():
        tokens, probs = got[k]
        p, q = (torch.tensor([d[t] for t in sorted(d)]) for d in (ref_probs, probs))
        assert len(p) == loaded.model.vocab_size and (p - q).abs().max() < 0.05, k  # bf16 rounding
        top2 = p.topk(2).values
        if top2[0] - top2[1] > 0.1:  # no near-tie: the first token must agree
            clear += 1
            assert tokens[:1] == ref_tokens[:1], k
    assert clear >= len(ref) // 2  # the check above is not vacuous
