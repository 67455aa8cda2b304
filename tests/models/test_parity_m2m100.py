"""NLLB-200 and M2M100 (``M2M100ForConditionalGeneration``) on the BART-family layers: greedy and
beam-search parity with transformers on random weights (fp32, CPU), every request forced into a
target language as the translate command does, run together through one engine with a small pool
(continuous batching and preemption)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import M2M100ForConditionalGeneration
from transformers.models.m2m_100.modeling_m2m_100 import M2M100SinusoidalPositionalEmbedding

from encdec_cli.engine import Engine, Request, SamplingParams
from encdec_models.bart import fairseq_sinusoidal_table
from encdec_models.loading import load_model
from tests.support.text_models import single_thread
from tests.support.translation_models import build_translation_model, sentence

MAX_NEW = 20
LANGS = {"nllb": ("eng_Latn", ("fra_Latn", "deu_Latn")), "m2m100": ("en", ("fr", "de"))}


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module", params=["nllb", "m2m100"])
def model(request, tmp_path_factory):
    return build_translation_model(request.param, tmp_path_factory.mktemp(request.param))


def _texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [sentence(rng) for _ in range(n)]


def _hf_generate(model, ids: torch.Tensor, mask, lang_id: int, **gen) -> list[list[int]]:
    hf = M2M100ForConditionalGeneration.from_pretrained(model.path).eval()
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=mask,
            forced_bos_token_id=lang_id,
            max_new_tokens=MAX_NEW,
            decoder_start_token_id=model.decoder_start_token_id,
            eos_token_id=model.eos_token_id,
            pad_token_id=model.pad_token_id,
            do_sample=False,
            **gen,
        )
    rows = []
    for row in out[:, 1:].tolist():
        rows.append(row[: row.index(model.eos_token_id)] if model.eos_token_id in row else row)
    return rows


def test_fairseq_positions_match_transformers():
    for n, dim, pad in ((130, 64, 1), (40, 33, 0)):
        theirs = M2M100SinusoidalPositionalEmbedding.get_embedding(n, dim, pad)
        assert torch.equal(fairseq_sinusoidal_table(n, dim, pad), theirs)


@pytest.mark.parametrize("absorbed", [False, True], ids=["kv", "absorbed"])
def test_greedy_parity(model, absorbed):
    src, targets = LANGS[model.name]
    tok = model.tokenizer(src)
    texts = _texts(1, 12)
    expected, requests = {}, []
    for j, tgt in enumerate(targets):  # two target languages in one engine run
        lang = model.lang_id(tgt)
        batch = tok(texts, padding=True, return_tensors="pt")
        for i, row in enumerate(_hf_generate(model, batch.input_ids, batch.attention_mask, lang)):
            expected[j * len(texts) + i] = row
        params = SamplingParams(
            max_new_tokens=MAX_NEW, stop_token_ids=(model.eos_token_id,), forced_tokens=((0, lang),)
        )
        requests += [
            Request(tok(t).input_ids, [model.decoder_start_token_id], params, j * len(texts) + i)
            for i, t in enumerate(texts)
        ]
    engine = Engine(
        load_model(model.path, device="cpu"),
        block_size=4,
        num_blocks=40,
        max_num_seqs=6,
        absorb_cross=absorbed,
    )
    got = {r.request_id: r for r in engine.generate(requests)}
    assert all(r.error is None for r in got.values())
    assert {i: r.token_ids for i, r in got.items()} == expected
    assert engine.stats.preemptions > 0  # the small pool made requests wait and recompute
    # the forced language leads, the outputs depend on the input and on the language
    assert all(expected[i][0] == model.lang_id(targets[i // len(texts)]) for i in expected)
    assert len({tuple(v[1:]) for v in expected.values()}) > len(expected) * 0.8
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_beam_parity(model):
    src, targets = LANGS[model.name]
    tok = model.tokenizer(src)
    lang = model.lang_id(targets[0])
    texts = _texts(2, 6)
    gen = dict(num_beams=4, length_penalty=1.5, early_stopping=True)
    expected = []
    for t in texts:  # one at a time: no padding, exactly what each request sees
        expected += _hf_generate(model, tok(t, return_tensors="pt").input_ids, None, lang, **gen)
    params = SamplingParams(
        max_new_tokens=MAX_NEW,
        stop_token_ids=(model.eos_token_id,),
        forced_tokens=((0, lang),),
        **gen,
    )
    engine = Engine(load_model(model.path, device="cpu"), block_size=4, num_blocks=300, max_num_seqs=16)
    reqs = [Request(tok(t).input_ids, [model.decoder_start_token_id], params, i) for i, t in enumerate(texts)]
    got = {r.request_id: r.token_ids for r in engine.generate(reqs)}
    assert [got[i] for i in range(len(texts))] == expected
    assert len({tuple(e) for e in expected}) == len(texts)


def test_pad_token_reads_the_zero_position_row(model):
    """A pad token inside an input takes fairseq's zero position row, as in transformers."""
    tok = model.tokenizer(LANGS[model.name][0])
    lang = model.lang_id(LANGS[model.name][1][0])
    ids = tok(_texts(3, 1)[0]).input_ids
    ids = ids[:3] + [model.pad_token_id] + ids[3:]
    x = torch.tensor([ids])
    expected = _hf_generate(model, x, torch.ones_like(x), lang)
    params = SamplingParams(max_new_tokens=MAX_NEW, stop_token_ids=(2,), forced_tokens=((0, lang),))
    engine = Engine(load_model(model.path, device="cpu"), block_size=4, num_blocks=40, max_num_seqs=4)
    (r,) = engine.generate([Request(ids, [model.decoder_start_token_id], params, 0)])
    assert [r.token_ids] == expected
