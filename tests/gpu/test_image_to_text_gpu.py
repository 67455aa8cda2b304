"""Image-to-text models on CUDA: the Triton kernels (ViT encoder, Florence-2's BART encoder, the
decoders) give the reference path's greedy tokens (float32: identical; bfloat16: >= 95% identical),
for TrOCR-, Donut- and Florence-2-shaped random models, in both cross-attention layouts."""

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


def _requests(kind: str, path, n: int = 12):
    images = draw_images(n, seed=1)
    params = SamplingParams(max_new_tokens=24, stop_token_ids=(EOS,))
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
        engine = Engine(loaded, block_size=16, max_num_seqs=8, enforce_eager=False, **cfg)
        out = {r.request_id: r for r in engine.generate(requests)}
        assert all(r.error is None for r in out.values()), [r.error for r in out.values()]
        assert engine.blocks.num_free == engine.blocks.num_blocks
        return {k: r.token_ids for k, r in out.items()}
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
    reqs = _requests(kind, tmp_path)
    ref = _run(loaded, reqs, "reference", absorb_cross=absorb_cross)
    got = _run(loaded, reqs, "triton", absorb_cross=absorb_cross)
    if dtype == torch.float32:
        assert got == ref
    else:
        same = sum(sum(a == b for a, b in zip(got[k], ref[k])) for k in ref)
        total = sum(max(len(got[k]), len(ref[k])) for k in ref)
        assert same / total >= 0.95
