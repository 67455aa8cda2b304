"""Vision encoder/decoder models: our engine vs transformers' generate on random-weight models
(fp32, CPU), on images drawn with Pillow and preprocessed by the model's own image processor."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoImageProcessor

from encdec_cli.engine import Engine, Request, SamplingParams
from tests.support.text_models import single_thread
from tests.support.vision_models import (
    BOS,
    EOS,
    PAD,
    draw_images,
    load_ours,
    random_donut,
    random_florence2,
    random_trocr,
)

transformers.logging.set_verbosity_error()


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _pixels(path, images) -> list[torch.Tensor]:
    proc = AutoImageProcessor.from_pretrained(path)
    return [proc(images=im, return_tensors="pt").pixel_values[0] for im in images]


def _hf_greedy(model, pixels, prompt, max_new) -> list[int]:
    out = model.generate(
        pixel_values=pixels[None],
        decoder_input_ids=torch.tensor([prompt]),
        max_new_tokens=max_new,
        do_sample=False,
        num_beams=1,
    )[0].tolist()[len(prompt) :]
    return out[: out.index(EOS)] if EOS in out else out


def _assert_parity(hf, path, prompts, max_new, n_images=5, **engine):
    images = draw_images(n_images, seed=3)
    pixels = _pixels(path, images)
    ref = [_hf_greedy(hf, px, p, m) for px, p, m in zip(pixels, prompts, max_new)]
    # transformers' TrOCR counts positions past pad tokens only: none may come out for equal positions
    assert all(PAD not in r for r in ref)
    long = [r for r in ref if len(r) >= 8]  # the model must discriminate between images
    assert len(long) >= 2 and len({tuple(r) for r in long}) == len(long)
    ours = Engine(load_ours(path), **{"block_size": 4, "num_blocks": 200, "max_num_seqs": 3, **engine})
    reqs = [
        Request(px, p, SamplingParams(max_new_tokens=m, stop_token_ids=(EOS,)), i)
        for i, (px, p, m) in enumerate(zip(pixels, prompts, max_new))
    ]
    out = {r.request_id: r for r in ours.generate(reqs)}
    assert all(r.error is None for r in out.values()), [r.error for r in out.values()]
    assert [out[i].token_ids for i in range(len(reqs))] == ref
    assert ours.blocks.num_free == ours.blocks.num_blocks
    return ours


TROCR_SHAPES = {
    "vit-trocr": dict(),
    # DeiT's distillation token; a decoder narrower than the encoder (enc_to_dec_proj); no embedding norm
    "deit-narrow-decoder": dict(
        encoder_type="deit",
        decoder=dict(d_model=32, decoder_attention_heads=2, layernorm_embedding=False, scale_embedding=True),
    ),
    # the decoder cross-attends to the encoder's width itself (cross_attention_hidden_size)
    "cross-hidden-size": dict(
        decoder=dict(d_model=32, decoder_attention_heads=2, cross_attention_hidden_size=48)
    ),
    # TrOCR-small's decoder: fixed (fairseq) sinusoidal positions, no embedding norm
    "sinusoidal-positions": dict(
        decoder=dict(use_learned_position_embeddings=False, layernorm_embedding=False)
    ),
    # a RoBERTa decoder (RobertaForCausalLM with cross-attention): BERT-style layers and LM head
    "roberta-decoder": dict(decoder_type="roberta"),
    "small-patches-no-qkv-bias": dict(
        image_size=32, patch_size=4, encoder=dict(num_hidden_layers=1, qkv_bias=False)
    ),
}


@pytest.mark.parametrize("absorb_cross", [False, True], ids=["kv", "absorbed"])
@pytest.mark.parametrize("shape", list(TROCR_SHAPES))
def test_trocr_greedy_matches_transformers(tmp_path, shape, absorb_cross):
    hf = random_trocr(tmp_path, seed=list(TROCR_SHAPES).index(shape), **TROCR_SHAPES[shape])
    _assert_parity(
        hf,
        tmp_path,
        [[BOS], [BOS, 7], [BOS], [BOS, 9, 4], [BOS]],
        [20, 12, 1, 16, 25],
        absorb_cross=absorb_cross,
    )


def test_encoder_output_matches_transformers(tmp_path):
    hf = random_trocr(tmp_path)
    ours = load_ours(tmp_path).model
    pixels = torch.stack(_pixels(tmp_path, draw_images(3)))
    batch = ours.prepare_encoder_batch(list(pixels), torch.device("cpu"))
    with torch.no_grad():
        ref = hf.encoder(pixel_values=pixels).last_hidden_state
        got = ours.encode(batch)
    torch.testing.assert_close(got, ref.reshape(-1, ref.shape[-1]), rtol=1e-4, atol=1e-4)


def test_bad_pixel_inputs_fail_alone(tmp_path):
    random_trocr(tmp_path)
    engine = Engine(load_ours(tmp_path), block_size=4, num_blocks=100, max_num_seqs=2)
    good = _pixels(tmp_path, draw_images(1))[0]
    nan = good.clone()
    nan[0, 0, 0] = float("nan")
    params = SamplingParams(max_new_tokens=4, stop_token_ids=(EOS,))
    inputs = [good, torch.zeros(3, 16, 16), nan, "x.png", good]
    out = {
        r.request_id: r for r in engine.generate(Request(x, [BOS], params, i) for i, x in enumerate(inputs))
    }
    assert out[0].error is None and out[4].error is None and out[0].token_ids == out[4].token_ids
    assert "[3, 32, 32]" in out[1].error and "NaN" in out[2].error and "pixel tensor" in out[3].error


DONUT_SHAPES = {
    # 16 x 12 patches, then 8 x 6 (padded to whole windows; shifted windows with masks)
    "swin-mbart": dict(),
    # a decoder wider than the encoder (enc_to_dec_proj), windows of 2 patches, an odd grid to merge
    "wide-decoder-odd-grid": dict(
        image_size=(36, 28),
        encoder=dict(window_size=3, depths=[2, 3], num_heads=[2, 2]),
        decoder=dict(d_model=48),
    ),
}


@pytest.mark.parametrize("shape", list(DONUT_SHAPES))
def test_donut_greedy_matches_transformers(tmp_path, shape):
    """Donut's task prompt goes into the decoder: prompts start with task tokens (ids 4..8)."""
    hf = random_donut(tmp_path, seed=list(DONUT_SHAPES).index(shape), **DONUT_SHAPES[shape])
    _assert_parity(hf, tmp_path, [[4], [5, 6, 40, 41, 7, 8], [BOS], [4, 9], [5]], [20, 12, 16, 1, 25])


def test_donut_encoder_output_matches_transformers(tmp_path):
    hf = random_donut(tmp_path)
    ours = load_ours(tmp_path).model
    pixels = torch.stack(_pixels(tmp_path, draw_images(2)))
    with torch.no_grad():
        ref = hf.encoder(pixel_values=pixels).last_hidden_state
        got = ours.encode(ours.prepare_encoder_batch(list(pixels), torch.device("cpu")))
    torch.testing.assert_close(got, ref.reshape(-1, ref.shape[-1]), rtol=1e-4, atol=1e-4)


FLORENCE_SHAPES = {
    "davit-bart": dict(),
    # a non-square image, windows that need padding, no q/k/v bias, pre-norm patch embedding first
    "non-square-no-qkv-bias": dict(
        image_size=(72, 40),
        vision=dict(window_size=4, qkv_bias=False, patch_prenorm=[False, False], num_groups=[4, 2]),
    ),
}


@pytest.mark.parametrize("absorb_cross", [False, True], ids=["kv", "absorbed"])
@pytest.mark.parametrize("shape", list(FLORENCE_SHAPES))
def test_florence2_greedy_matches_transformers(tmp_path, shape, absorb_cross):
    """Image tokens and the task prompt's tokens form the BART encoder's input (packed, of different
    lengths per request); the decoder starts from </s>."""
    from transformers import AutoProcessor

    hf = random_florence2(tmp_path, seed=list(FLORENCE_SHAPES).index(shape), **FLORENCE_SHAPES[shape])
    proc = AutoProcessor.from_pretrained(tmp_path)
    tasks = ["<CAPTION>", "<OCR>", "<OD>", "<DETAILED_CAPTION>", "<OCR_WITH_REGION>"]
    max_new = [20, 12, 16, 1, 25]
    inputs = [proc(text=t, images=im, return_tensors="pt") for t, im in zip(tasks, draw_images(5, seed=5))]
    ref = []
    for x, m in zip(inputs, max_new):
        out = hf.generate(**x, max_new_tokens=m, do_sample=False, num_beams=1)[0].tolist()[1:]
        ref.append(out[: out.index(EOS)] if EOS in out else out)
    long = [r for r in ref if len(r) >= 8]
    assert len(long) >= 2 and len({tuple(r) for r in long}) == len(long)
    assert len({len(x.input_ids[0]) for x in inputs}) > 1  # prompts of different lengths
    engine = Engine(
        load_ours(tmp_path), block_size=4, num_blocks=300, max_num_seqs=3, absorb_cross=absorb_cross
    )
    reqs = [
        Request(
            {"pixel_values": x.pixel_values[0], "input_ids": x.input_ids[0].tolist()},
            [EOS],
            SamplingParams(max_new_tokens=m, stop_token_ids=(EOS,)),
            i,
        )
        for i, (x, m) in enumerate(zip(inputs, max_new))
    ]
    out = {r.request_id: r for r in engine.generate(reqs)}
    assert all(r.error is None for r in out.values()), [r.error for r in out.values()]
    assert [out[i].token_ids for i in range(len(reqs))] == ref
    assert engine.blocks.num_free == engine.blocks.num_blocks


FLORENCE_TOWERS = {
    **FLORENCE_SHAPES,
    # two blocks a stage, whole windows (no padding): the windows go back in place inside the add
    "deeper-whole-windows": dict(image_size=(96, 96), vision=dict(depths=[2, 2], window_size=4)),
    # a LayerNorm over the pixels' channels before the first convolution
    "pixel-prenorm": dict(vision=dict(patch_prenorm=[True, True])),
}


@pytest.mark.parametrize("shape", list(FLORENCE_TOWERS))
def test_florence2_image_features_match_transformers(tmp_path, shape):
    """The DaViT tower + projector (token rows, channel attention as batched GEMMs, norms with the
    convolutions' residuals fused) against transformers' get_image_features, fp32."""
    kw = FLORENCE_TOWERS[shape]
    hf = random_florence2(tmp_path, seed=3, **kw)
    ours = load_ours(tmp_path).model
    h, w = kw.get("image_size", (64, 64))
    pixels = torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf.model.get_image_features(pixels)
        ref = getattr(ref, "pooler_output", ref)
        got = ours.image_features(pixels)
        # channels-last pixels: the same values in, one cast-and-layout copy
        again = ours.image_features(pixels.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


def test_florence2_image_flops_count_what_transformers_computes(tmp_path):
    """``encdec bench``'s encoder floor for W9 counts the vision tower: one image's matmul and
    convolution FLOPs through our tower and projector (torch's FlopCounterMode) equal those of
    transformers' get_image_features, on a shape with padded windows and one with whole ones."""
    from torch.utils.flop_counter import FlopCounterMode

    from encdec_cli.tasks.bench import image_flops

    for i, shape in enumerate(("davit-bart", "deeper-whole-windows")):
        kw = FLORENCE_TOWERS[shape]
        path = tmp_path / shape
        hf = random_florence2(path, seed=i, **kw)
        h, w = kw.get("image_size", (64, 64))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            hf.model.get_image_features(torch.zeros(1, 3, h, w))
        assert image_flops(load_ours(path).model, (3, h, w)) == counter.get_total_flops() > 0


def test_pixel_value_check_and_batch_stacking():
    """The finite check (a sum first, the element-wise scan only when finite values overflow it) and
    prepare_encoder_batch's stacking, which takes the values encoder_length checked."""
    from encdec_models.base import stack_to_device
    from encdec_models.vision import all_finite, check_pixels

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.randn(3, 40, 40).to(dtype)
        assert all_finite(x)
        for bad in (float("nan"), float("inf"), -float("inf")):
            y = x.clone()
            y[1, 3, 7] = bad
            assert not all_finite(y), (dtype, bad)
            with pytest.raises(ValueError, match="NaN or infinite"):
                check_pixels(y, (3, 40, 40))
            assert check_pixels(y, (3, 40, 40), values=False) is y  # shape and type only
        assert all_finite(torch.full((3, 40, 40), torch.finfo(dtype).max, dtype=dtype))  # the sum overflows
    with pytest.raises(ValueError, match=r"\[3, 40, 40\]"):
        check_pixels(torch.zeros(3, 40, 41), (3, 40, 40), values=False)
    items = [torch.randn(3, 8, 8).half() for _ in range(3)]
    out = stack_to_device(items, torch.device("cpu"))
    assert out.dtype == torch.float16 and torch.equal(out, torch.stack(items))
    mixed = stack_to_device([items[0].float(), items[1]], torch.device("cpu"), torch.float32)
    assert mixed.dtype == torch.float32 and torch.equal(mixed[1], items[1].float())
