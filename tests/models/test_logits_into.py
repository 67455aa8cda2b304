"""Every model's decoder head writes its logits into a given output tensor (``decoder_head(...,
out)``, ``layers.logits_into``): a CUDA graph's shared output (``engine/cuda_graphs.py``) takes
the lm head's product directly instead of a copy after it. The values are those of the head
without ``out``, bit for bit, for each head's form: a plain lm head (Whisper, Moonshine, T5 v1.1),
an output rescale (T5), a logits bias (BART, M2M100, the RoBERTa decoder's dense + GELU + norm
head), soft-capping (T5Gemma), and Florence-2's head through its language model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from encdec_models.loading import load_model


def _whisper(path):
    from tests.support.whisper_models import random_whisper

    random_whisper(path)


def _moonshine(path):
    from tests.models.test_parity_moonshine import _build

    _build(path, tied=False)


def _t5gemma(path):
    from tests.models.test_parity_t5gemma import _build

    _build(path, "sliding")


def _roberta(path):
    from tests.support.vision_models import random_trocr

    random_trocr(path, decoder_type="roberta")


def _florence2(path):
    from tests.support.vision_models import random_florence2

    random_florence2(path)


def _m2m100(path):
    from tests.support.translation_models import build_translation_model

    build_translation_model("m2m100", path)


BUILDERS = {
    "whisper": _whisper,
    "moonshine": _moonshine,
    "t5gemma": _t5gemma,
    "roberta-decoder": _roberta,
    "florence2": _florence2,
    "m2m100": _m2m100,
}


def _check(model, seed: int = 0) -> None:
    torch.manual_seed(seed)
    meta = SimpleNamespace(logits_indices=torch.tensor([0, 2, 3, 6]))
    with torch.inference_mode():
        x = model.embed_decoder(torch.arange(3, 10), torch.arange(7))  # [7, the decoder's width]
        residual = torch.randn_like(x)
        want = model.decoder_head(x, residual, meta)
        out = torch.full_like(want, float("nan"))
        got = model.decoder_head(x, residual, meta, out)
    assert got.data_ptr() == out.data_ptr(), "the logits were not written into out"
    assert torch.equal(out, want)
    assert want.abs().max() > 0


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_logits_go_into_the_given_output(family, tmp_path):
    BUILDERS[family](tmp_path)
    _check(load_model(tmp_path, device="cpu", dtype="float32").model)


@pytest.mark.parametrize("name", ["bart", "t5", "t5_v1_1"])
def test_text_models_logits_go_into_the_given_output(name, tiny_text_model):
    _check(load_model(tiny_text_model(name).path, device="cpu", dtype="float32").model)
