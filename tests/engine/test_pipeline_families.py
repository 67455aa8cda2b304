"""Pipeline parallelism for every model family beyond Whisper / BART / T5 (tests/engine/test_pipeline.py):
two stages on the CPU over gloo give the tokens of one process (whose tokens the parity tests in
tests/models check against transformers) for Moonshine (raw waveforms, rotary positions), T5Gemma
(rotary, soft-capping, sliding windows, an encoder wider than the decoder), NLLB / M2M100 (fairseq
positions), the vision encoder/decoder models (TrOCR, Donut: the image encoder runs whole on stage 0)
and Florence-2 (the vision tower on stage 0, the BART encoder split); speculative decoding and the
prefix cache across stages."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from encdec_cli.engine import Engine, Request, SamplingParams
from tests.support.text_models import random_words, source_ids, vocabulary

POOL = dict(block_size=4, max_num_seqs=3, device="cpu", dtype="float32")


def _tokens(engine: Engine, requests: list[Request]) -> list[list[int]]:
    out = {r.request_id: r for r in engine.generate(requests)}
    assert all(r.error is None for r in out.values()), [r.error for r in out.values()]
    assert engine.blocks.num_free == engine.blocks.num_blocks or engine.prefix_caching
    return [out[i].token_ids for i in range(len(requests))]


def _same_in_stages(path, make, num_blocks: int, pp_layers=None, **extra) -> list[list[int]]:
    """The requests' tokens in one process, asserted equal with 2 stages; returns them."""
    one = Engine(str(path), num_blocks=num_blocks, **POOL, **extra)
    want = _tokens(one, make())
    one.close()
    assert sum(len(t) for t in want) > 2 * len(want), want  # outputs worth comparing
    two = Engine(str(path), num_blocks=num_blocks, pipeline_parallel=2, pp_layers=pp_layers, **POOL, **extra)
    try:
        assert _tokens(two, make()) == want
        assert len(two.stats.stage_busy_seconds) == 2
    finally:
        two.close()
    return want


def test_moonshine(tmp_path):
    from tests.models.test_parity_moonshine import EOT, SOT
    from tests.models.test_parity_moonshine import _build as build_moonshine

    build_moonshine(tmp_path, tied=False)
    rng = np.random.default_rng(0)
    waves = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in (4000, 9000, 6500)]
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(EOT,))
    make = lambda: [Request(w, [SOT], params, i) for i, w in enumerate(waves)]  # noqa: E731
    # stage 0: both encoder layers and one decoder layer; stage 1: the last decoder layer
    _same_in_stages(tmp_path, make, 120, pp_layers=(3, 1))


@pytest.mark.parametrize("shape", ["sliding", "full-wide-encoder"])
def test_t5gemma(tmp_path, shape):
    from tests.models.test_parity_t5gemma import BOS, EOS, _inputs
    from tests.models.test_parity_t5gemma import _build as build_t5gemma

    build_t5gemma(tmp_path, shape)
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(EOS,))
    make = lambda: [Request(ids, [BOS], params, i) for i, ids in enumerate(_inputs(4, 1))]  # noqa: E731
    # the cut inside the encoder (2 layers): its activations travel, then the encoder output
    # (wider than the decoder in one shape) to the decoder layers (3 and 2)
    _same_in_stages(tmp_path, make, 60, pp_layers=(1, 4) if shape == "sliding" else (1, 3))


def test_t5gemma2(tmp_path):
    """Merged self/cross attention (its cross cache written on the decoder's stages), images through
    the SigLIP tower on stage 0, text-only inputs beside them."""
    from tests.models.test_parity_t5gemma2 import BOS, EOS, _image_inputs, _inputs
    from tests.models.test_parity_t5gemma2 import _build as build_t5gemma2

    build_t5gemma2(tmp_path)
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(EOS,))
    items = [*_image_inputs(2, 11), *_inputs(2, 1)]
    make = lambda: [Request(x, [BOS], params, i) for i, x in enumerate(items)]  # noqa: E731
    # 3 + 3 layers: the cut inside the encoder, then a stage with the encoder's last and every decoder layer
    _same_in_stages(tmp_path, make, 120, pp_layers=(2, 4))


@pytest.mark.parametrize("name", ["nllb", "m2m100"])
def test_nllb_m2m100(tmp_path, name):
    from tests.support.translation_models import build_translation_model, sentence

    model = build_translation_model(name, tmp_path)
    src, tgt = ("eng_Latn", "fra_Latn") if name == "nllb" else ("en", "fr")
    tok = model.tokenizer(src)
    rng = random.Random(2)
    ids = [tok(sentence(rng)).input_ids for _ in range(4)]
    prompt = [model.decoder_start_token_id, model.lang_id(tgt)]
    params = SamplingParams(max_new_tokens=12, num_beams=2, stop_token_ids=(model.eos_token_id,))
    make = lambda: [Request(x, prompt, params, i) for i, x in enumerate(ids)]  # noqa: E731
    _same_in_stages(tmp_path, make, 80)


def _pixels(path, n: int) -> list[torch.Tensor]:
    from transformers import AutoImageProcessor

    from tests.support.vision_models import draw_images

    proc = AutoImageProcessor.from_pretrained(path)
    return [proc(images=im, return_tensors="pt").pixel_values[0] for im in draw_images(n, seed=3)]


@pytest.mark.parametrize("kind", ["trocr-narrow-decoder", "trocr-cross-hidden-size", "donut"])
def test_vision_encoder_decoder(tmp_path, kind):
    """The image encoder runs whole on stage 0 (it has no uniform layer stack to cut): the stages
    split the decoder's layers."""
    from tests.support.vision_models import BOS, EOS, random_donut, random_trocr

    if kind == "donut":
        random_donut(tmp_path)
    elif kind == "trocr-narrow-decoder":
        random_trocr(tmp_path, encoder_type="deit", decoder=dict(d_model=32, decoder_attention_heads=2))
    else:
        narrow = dict(d_model=32, decoder_attention_heads=2, cross_attention_hidden_size=48)
        random_trocr(tmp_path, decoder=narrow)
    pixels = _pixels(tmp_path, 4)
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(EOS,))
    prompt = [4] if kind == "donut" else [BOS]
    make = lambda: [Request(px, prompt, params, i) for i, px in enumerate(pixels)]  # noqa: E731
    from encdec_cli.engine.pipeline import StagePlan

    plan = StagePlan([1, 1], 0, 0)
    assert plan.has_encoder and plan.describe() == "the encoder, decoder layers 0-0"
    _same_in_stages(tmp_path, make, 200)


def test_florence2(tmp_path):
    from transformers import AutoProcessor

    from tests.support.vision_models import EOS, draw_images, random_florence2

    random_florence2(tmp_path)
    proc = AutoProcessor.from_pretrained(tmp_path)
    tasks = ["<CAPTION>", "<OCR>", "<DETAILED_CAPTION>"]
    inputs = [proc(text=t, images=im, return_tensors="pt") for t, im in zip(tasks, draw_images(3, seed=5))]
    items = [{"pixel_values": x.pixel_values[0], "input_ids": x.input_ids[0].tolist()} for x in inputs]
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(EOS,))
    make = lambda: [Request(x, [EOS], params, i) for i, x in enumerate(items)]  # noqa: E731
    # stage 0: the vision tower and the first BART encoder layer
    _same_in_stages(tmp_path, make, 300, pp_layers=(1, 3))


def test_speculative_decoding_across_stages(tiny_text_model):
    """Verification steps (K + 1 queries a sequence, the logits of every draft position) run through
    the stages: greedy tokens unchanged, drafts accepted."""
    tiny = tiny_text_model("bart")
    rng = random.Random(4)
    eos = vocabulary(tiny.name)["</s>"]
    srcs = [source_ids(tiny.name, random_words(rng, rng.randint(4, 10))) for _ in range(5)]
    params = SamplingParams(max_new_tokens=14, stop_token_ids=[eos])
    make = lambda: [Request(s, [tiny.decoder_start_token_id], params, i) for i, s in enumerate(srcs)]  # noqa: E731
    one = Engine(str(tiny.path), num_blocks=60, **POOL)
    want = _tokens(one, make())
    engine = Engine(str(tiny.path), num_blocks=60, pipeline_parallel=2, speculative="ngram:3", **POOL)
    try:
        assert _tokens(engine, make()) == want
        assert engine.stats.verify_steps > 0 and engine.stats.draft_tokens > 0
    finally:
        engine.close()


def test_prefix_cache_across_stages(tiny_text_model):
    """Requests with one encoder input share its encoder run and cross blocks on every stage."""
    tiny = tiny_text_model("t5")
    rng = random.Random(5)
    eos = vocabulary(tiny.name)["</s>"]
    srcs = [source_ids(tiny.name, random_words(rng, rng.randint(3, 9))) for _ in range(3)]
    srcs = srcs + srcs[:2] + srcs  # duplicates
    params = SamplingParams(max_new_tokens=10, stop_token_ids=[eos])
    make = lambda: [Request(s, [tiny.decoder_start_token_id], params, i) for i, s in enumerate(srcs)]  # noqa: E731
    off = Engine(str(tiny.path), num_blocks=80, prefix_cache=False, **POOL)
    want = _tokens(off, make())
    engine = Engine(str(tiny.path), num_blocks=80, pipeline_parallel=2, **POOL)
    try:
        assert engine.prefix_caching
        assert _tokens(engine, make()) == want
        assert engine.stats.prefix_cache_hits > 0
    finally:
        engine.close()
