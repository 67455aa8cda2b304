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
        # the references index with masks (host syncs): they run eagerly, the Triton kernels in graphs
        engine = Engine(loaded, block_size=16, max_num_seqs=8, enforce_eager=kernels == "reference", **cfg)
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
        # bf16: a near-tie that rounds the other way sends one request down another path for the
        # rest of its tokens (donut, absorbed: 265 of 288 tokens equal); a kernel bug would change
        # most requests from their first tokens on
        assert sum(got[k] == ref[k] for k in ref) >= 0.75 * len(ref)
        same = sum(sum(a == b for a, b in zip(got[k], ref[k])) for k in ref)
        total = sum(max(len(got[k]), len(ref[k])) for k in ref)
        assert same / total >= 0.85


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_florence2_tower_on_cuda_matches_transformers(tmp_path, dtype):
    """The DaViT tower laid out for the GPU (channels-last convolutions through cuDNN, the channel
    attention's batched GEMMs on expanded weights, the fused norms) against transformers' on the same
    device; and pixels stacked through pinned memory arrive as they were."""
    from encdec_models.base import stack_to_device

    hf = random_florence2(tmp_path, image_size=(96, 96), vision=dict(depths=[2, 2], window_size=4))
    hf = hf.to("cuda", dtype)
    ours = load_ours(tmp_path, dtype).model.to("cuda")
    host = [torch.randn(3, 96, 96, generator=torch.Generator().manual_seed(i)).half() for i in range(4)]
    pixels = stack_to_device(host, torch.device("cuda"))
    assert pixels.is_cuda and torch.equal(pixels.cpu(), torch.stack(host))
    with torch.inference_mode():
        ref = hf.model.get_image_features(pixels.to(dtype))
        ref = getattr(ref, "pooler_output", ref).float()
        got = ours.image_features(pixels).float()
    assert got.shape == ref.shape
    # relative to the features' size: cuDNN runs both sides' convolutions in TF32 by default, with
    # different algorithms (channels-last here, NCHW there)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < (1e-2 if dtype == torch.float32 else 5e-2), rel
