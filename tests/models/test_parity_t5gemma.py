"""T5Gemma on the shared layers: greedy and beam parity with transformers on random weights (fp32,
CPU): grouped-query attention, Gemma's (1 + w) RMSNorms before and after every sub-layer, rotary
positions, score and logit soft-capping, and sliding-window layers (window 4, shorter than the
inputs and outputs, so the window decides what a layer sees); an encoder wider than the decoder. The
lm_head is untied (a random tied one makes the decoder repeat one token whatever the input), and
tied in one more test (loaded from the embedding: the checkpoint does not store it)."""

from __future__ import annotations

import pytest
import torch
from transformers import T5GemmaConfig, T5GemmaForConditionalGeneration

from encdec_cli.engine import Engine, Request, SamplingParams
from encdec_models.loading import load_model
from tests.support.text_models import single_thread
from tests.support.whisper_models import discriminating_init_

VOCAB, BOS, EOS, PAD = 120, 2, 1, 0
MAX_NEW = 16


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _side(hidden: int, layers: int, window: int | None, kinds: list[str]) -> dict:
    return dict(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=window, layer_types=kinds, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
        rms_norm_eps=1e-6, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS, dropout_rate=0.0,
        max_position_embeddings=256,
    )  # fmt: skip


SHAPES = {
    # decoder layers alternate sliding (window 4) and full, as Gemma 2 does; the encoder too
    "sliding": (
        _side(48, 2, 4, ["sliding_attention", "full_attention"]),
        _side(48, 3, 4, ["sliding_attention", "full_attention", "sliding_attention"]),
    ),
    # no sliding layers; an encoder wider than the decoder (cross-attention projects 64 -> heads)
    "full-wide-encoder": (
        _side(64, 2, 4096, ["full_attention"] * 2),
        _side(48, 2, 4096, ["full_attention"] * 2),
    ),
}


def _build(tmp_path, shape: str, tied: bool = False) -> T5GemmaForConditionalGeneration:
    enc, dec = SHAPES[shape]
    # eager attention: transformers' SDPA path drops the score soft-capping, and T5Gemma picked SDPA
    # by default up to transformers 5.17 (a reference that ignored attn_logit_softcapping)
    cfg = T5GemmaConfig(encoder=enc, decoder=dec, vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS,
                        bos_token_id=BOS, tie_word_embeddings=tied, attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    model = T5GemmaForConditionalGeneration(cfg).eval()
    discriminating_init_(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name:  # unit variance after the sqrt(hidden) scale
                p.mul_(p.shape[-1] ** -0.5)
            elif "norm" in name:  # Gemma norms scale by (1 + w): w around 0
                p.copy_(torch.randn(p.shape) * 0.3)
    model.save_pretrained(tmp_path)
    return model


def _inputs(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = [3, 12, 7, 20, 9, 15][:n]
    return [torch.randint(3, VOCAB, (k,), generator=g).tolist() + [EOS] for k in lens]


def _hf(model, ids, **gen) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, decoder_start_token_id=BOS,
            eos_token_id=EOS, pad_token_id=PAD, **gen,
        )[0, 1:].tolist()  # fmt: skip
    return out[: out.index(EOS)] if EOS in out else out


@pytest.mark.parametrize("shape,tied", [("sliding", False), ("full-wide-encoder", False), ("sliding", True)])
def test_greedy_parity(shape, tied, tmp_path):
    hf = _build(tmp_path, shape, tied)
    inputs = _inputs(6, 1)
    expected = [_hf(hf, ids) for ids in inputs]
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.architecture == "T5GemmaForConditionalGeneration" and loaded.tokenizer is None
    engine = Engine(loaded, num_blocks=40, block_size=4, max_num_seqs=4)
    params = SamplingParams(max_new_tokens=MAX_NEW, stop_token_ids=(EOS,), logprobs=True)
    got = {
        r.request_id: r
        for r in engine.generate(Request(ids, [BOS], params, i) for i, ids in enumerate(inputs))
    }
    assert [got[i].token_ids for i in range(len(inputs))] == expected
    assert engine.blocks.num_free == engine.blocks.num_blocks
    if not tied:  # the outputs depend on the input
        assert len({tuple(e) for e in expected}) >= len(expected) - 1


def test_sliding_window_matters(tmp_path):
    """The same weights with the window removed give other tokens: the window is really applied."""
    hf = _build(tmp_path, "sliding")
    inputs = _inputs(4, 2)
    windowed = [_hf(hf, ids) for ids in inputs]
    for side in (hf.config.encoder, hf.config.decoder):
        side.layer_types = ["full_attention"] * side.num_hidden_layers
    full = T5GemmaForConditionalGeneration(hf.config).eval()
    full.load_state_dict(hf.state_dict())
    assert [_hf(full, ids) for ids in inputs] != windowed


def test_attention_softcapping_matters(tmp_path):
    """The same weights without the attention scores' soft-capping give other tokens: the reference
    really applies it (transformers' SDPA attention silently does not), and so do we (matched above)."""
    hf = _build(tmp_path, "sliding")
    inputs = _inputs(4, 2)
    capped = [_hf(hf, ids) for ids in inputs]
    for side in (hf.config.encoder, hf.config.decoder):
        side.attn_logit_softcapping = None
    uncapped = T5GemmaForConditionalGeneration(hf.config).eval()
    uncapped.load_state_dict(hf.state_dict())
    assert [_hf(uncapped, ids) for ids in inputs] != capped


def test_beam_parity(tmp_path):
    hf = _build(tmp_path, "sliding")
    inputs = _inputs(4, 3)
    gen = dict(num_beams=3, length_penalty=1.2, early_stopping=True)
    expected = [_hf(hf, ids, **gen) for ids in inputs]
    engine = Engine(load_model(tmp_path, device="cpu"), num_blocks=200, block_size=4, max_num_seqs=12)
    params = SamplingParams(max_new_tokens=MAX_NEW, stop_token_ids=(EOS,), **gen)
    got = {
        r.request_id: r.token_ids
        for r in engine.generate(Request(ids, [BOS], params, i) for i, ids in enumerate(inputs))
    }
    assert [got[i] for i in range(len(inputs))] == expected
