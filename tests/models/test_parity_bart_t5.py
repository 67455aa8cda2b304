"""Greedy parity with transformers for the BART family (BART, mBART, Marian, Pegasus) and the T5
family (T5 v1.0, T5 v1.1 / Flan-style, mT5), on tiny trained models (see tests/support/text_models.py).

Our engine runs every architecture's requests through one Engine with a small KV pool and fewer
sequence slots than requests, so continuous batching and preemption (recompute) happen; its
tokens must be IDENTICAL to ``model.generate`` (greedy) of the same folder loaded by transformers.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, MarianMTModel

from encdec_cli.engine import Engine, Request, SamplingParams
from encdec_models.bart import Bart, sinusoidal_table
from encdec_models.loading import load_model
from encdec_models.registry import UnsupportedModelError
from encdec_models.t5 import T5
from tests.support.text_models import (
    MAX_POSITIONS,
    N_WORDS,
    NAMES,
    TinyTextModel,
    build_config,
    build_tiny_model,
    build_tokenizer,
    single_thread,
)

NUM_REQUESTS = 24
MAX_NEW_TOKENS = 24
# 14 blocks of 4 tokens: the longest request (22 encoder tokens, 1 + 24 decoder tokens) needs 13 at
# its longest, so long requests cannot all grow together: admission waits for room and running
# sequences get preempted (and recomputed later) when their next block is not there.
ENGINE = dict(block_size=4, num_blocks=14, max_num_seqs=6)


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def sentences(seed: int) -> list[str]:
    """Mixed lengths: 1..20 words (the models were trained on up to 12), shuffled."""
    rng = random.Random(seed)
    lengths = [1, 2, 20, 19] + [rng.randint(1, 20) for _ in range(NUM_REQUESTS - 4)]
    return [" ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(n)) for n in lengths]


def reference_outputs(tiny, tok, texts: list[str]) -> list[tuple[list[int], list[float]]]:
    """transformers greedy, batched with right padding: per text, the new tokens (without the
    decoder start token, cut before the first EOS, as our Results are) and their log-probabilities
    (log-softmax of the processed scores, as our engine computes them)."""
    hf = AutoModelForSeq2SeqLM.from_pretrained(tiny.path).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    extra = {} if tiny.forced_bos_token_id is None else {"forced_bos_token_id": tiny.forced_bos_token_id}
    with torch.no_grad():
        out = hf.generate(
            batch.input_ids,
            attention_mask=batch.attention_mask,
            do_sample=False,
            num_beams=1,
            max_new_tokens=MAX_NEW_TOKENS,
            decoder_start_token_id=tiny.decoder_start_token_id,
            eos_token_id=tiny.eos_token_id,
            pad_token_id=tiny.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
            **extra,
        )
    seqs = out.sequences
    assert (seqs[:, 0] == tiny.decoder_start_token_id).all()
    new = seqs[:, 1:]
    logprobs = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)  # [B, steps, V]
    chosen = logprobs.gather(2, new[:, : logprobs.shape[1], None])[..., 0]
    rows = []
    for row, lp in zip(new.tolist(), chosen.tolist()):
        n = row.index(tiny.eos_token_id) if tiny.eos_token_id in row else len(row)
        rows.append((row[:n], lp[:n]))
    return rows


def run_engine(loaded, tiny, encoder_ids: list[list[int]], **config) -> tuple[Engine, list]:
    """Greedy through one Engine (small pool, fewer slots than requests); results in input order."""
    engine = Engine(loaded, **{**ENGINE, **config})
    params = SamplingParams(
        max_new_tokens=MAX_NEW_TOKENS,
        stop_token_ids=(tiny.eos_token_id,),
        forced_tokens=tiny.forced_tokens,
        logprobs=True,
    )
    requests = [Request(ids, tiny.prompt_ids, params, request_id=i) for i, ids in enumerate(encoder_ids)]
    results = {r.request_id: r for r in engine.generate(requests)}
    assert sorted(results) == list(range(len(encoder_ids)))
    assert all(r.error is None for r in results.values()), [r.error for r in results.values()]
    return engine, [results[i] for i in range(len(encoder_ids))]


def assert_same(name, texts, results, expected) -> None:
    """Identical tokens, and log-probabilities that agree: they see every logit, so a missing bias
    or scale shows even where the argmax holds."""
    for i, (r, (tokens, logprobs)) in enumerate(zip(results, expected)):
        assert r.token_ids == tokens, f"{name} request {i} ({texts[i]!r}): ours {r.token_ids} != {tokens}"
        torch.testing.assert_close(r.logprobs, logprobs, rtol=0, atol=2e-4)
        assert r.finish_reason == ("length" if len(tokens) == MAX_NEW_TOKENS else "stop"), i


# absorbed: cross-attention over the encoder output, K/V projections moved into the query and the
# output (the GPU default). A cross block then holds 16 (BART family) or 20 (T5: d_kv * heads = 64
# is wider than d_model 48) encoder rows, so a smaller pool (10 blocks: the longest request needs
# 2 + 7) keeps the preemptions.
ABSORBED = dict(absorb_cross=True, num_blocks=10)


@pytest.mark.slow  # trains the tiny model on first use (~5-30 s each)
@pytest.mark.parametrize("absorbed", [False, True], ids=["kv", "absorbed"])
@pytest.mark.parametrize("name", NAMES)
def test_greedy_parity_with_transformers(name, absorbed, tiny_text_model):
    tiny = tiny_text_model(name)
    loaded = load_model(tiny.path, device="cpu", dtype="float32")
    assert loaded.architecture == tiny.architecture
    assert isinstance(loaded.model, T5 if "t5" in name else Bart)
    tok = loaded.tokenizer
    texts = sentences(seed=NAMES.index(name))
    encoder_ids = [tok(t).input_ids for t in texts]
    engine, results = run_engine(loaded, tiny, encoder_ids, **(ABSORBED if absorbed else {}))
    assert_same(name, texts, results, reference_outputs(tiny, tok, texts))
    assert engine.scheduler.num_preemptions > 0, "the small pool should force a preemption"

    # The comparison only means something if the model is input-dependent and not degenerate.
    ours = [r.token_ids for r in results]
    if tiny.forced_bos_token_id is not None:
        assert all(o[:1] == [tiny.forced_bos_token_id] for o in ours)
    content = [tuple(o[1:] if tiny.forced_bos_token_id is not None else o) for o in ours]
    assert len(set(content)) >= 0.8 * NUM_REQUESTS, f"{name}: outputs barely depend on the input"
    mean_distinct = sum(len(set(o)) for o in content) / NUM_REQUESTS
    assert mean_distinct > 3, f"{name}: outputs are near single-token repeats ({mean_distinct:.1f})"


def test_marian_separate_vocabularies(tmp_path):
    """Marian with its own decoder vocabulary (share_encoder_decoder_embeddings=False). Untrained:
    the log-probability comparison is what makes it discriminating."""
    torch.manual_seed(0)
    config = build_config("marian")
    config.share_encoder_decoder_embeddings = False
    config.decoder_vocab_size = config.vocab_size + 7
    hf = MarianMTModel(config)
    with torch.no_grad():
        hf.final_logits_bias.normal_(0.0, 1.0)
    hf.generation_config.forced_eos_token_id = None  # Marian's default forces EOS at max length
    hf.save_pretrained(tmp_path)
    tok = build_tokenizer("marian")
    tok.save_pretrained(tmp_path)
    ids = dict(
        decoder_start_token_id=config.decoder_start_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    tiny = TinyTextModel(
        "marian", tmp_path, "MarianMTModel", forced_bos_token_id=None, **ids, train_steps=0, train_seconds=0.0
    )
    loaded = load_model(tmp_path, device="cpu", dtype="float32")
    model = loaded.model
    assert (
        model.vocab_size == config.vocab_size + 7
        and model.lm_head.weight is model.decoder.embed_tokens.weight
    )
    loaded.tokenizer = None  # the extra decoder ids have no text
    texts = sentences(seed=99)[:8]
    _, results = run_engine(loaded, tiny, [tok(t).input_ids for t in texts])
    assert_same("marian-separate", texts, results, reference_outputs(tiny, tok, texts))


def untrained(name: str, tmp_path_factory) -> TinyTextModel:
    return build_tiny_model(name, tmp_path_factory.mktemp(f"untrained-{name}"), max_steps=0)


def test_tied_and_untied_lm_heads(tmp_path_factory):
    """A checkpoint without lm_head.weight ties it to the embedding (one tensor, not two); one
    with its own lm_head keeps it; T5 v1.0 rescales the decoder output, v1.1 and mT5 do not."""
    t5 = load_model(untrained("t5", tmp_path_factory).path, device="cpu", dtype="float32").model
    assert t5.lm_head.weight is t5.shared.weight and t5.output_scale == 48**-0.5
    for name in ("t5_v1_1", "mt5"):
        m = load_model(untrained(name, tmp_path_factory).path, device="cpu", dtype="float32").model
        assert m.lm_head.weight is not m.shared.weight and m.output_scale == 1.0
    bart = load_model(untrained("bart", tmp_path_factory).path, device="cpu", dtype="float32").model
    assert bart.lm_head.weight is bart.shared.weight
    assert bart.final_logits_bias.abs().sum() > 0  # the checkpoint's (random) bias was loaded


def test_sinusoidal_table_matches_transformers():
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    for n, d in ((MAX_POSITIONS, 48), (10, 7)):  # even and odd widths
        ref = MarianSinusoidalPositionalEmbedding(n, d).create_weight()
        assert torch.equal(sinusoidal_table(n, d), ref)


def test_encoder_input_errors(tmp_path_factory):
    """Bad encoder inputs become error Results (the other requests still run)."""
    tiny = untrained("bart", tmp_path_factory)
    loaded = load_model(tiny.path, device="cpu", dtype="float32")
    engine = Engine(loaded, **ENGINE)
    params = SamplingParams(max_new_tokens=4, stop_token_ids=(tiny.eos_token_id,))
    vocab = loaded.model.vocab_size
    inputs = {
        "empty": [],
        "long": [5] * (MAX_POSITIONS + 1),
        "id": [5, vocab],
        "text": "w1 w2",
        "bool": [0, True, 2],
        "float": [0, 5.0, 2],
        "nested": [[0, 5], [2, 3]],
        "ok": [0, 5, 2],
        "ok_array": np.array([0, 5, 2], dtype=np.int32),
    }
    reqs = [Request(x, tiny.prompt_ids, params, request_id=k) for k, x in inputs.items()]
    results = {r.request_id: r for r in engine.generate(reqs)}
    assert "empty encoder input" in results["empty"].error
    assert f"at most {MAX_POSITIONS}" in results["long"].error
    assert "outside the model's vocabulary" in results["id"].error
    assert "list of token ids" in results["text"].error
    assert "integer token ids only (found a bool)" in results["bool"].error
    assert "integer token ids only" in results["float"].error
    assert "1-D sequence of token ids, got shape (2, 2)" in results["nested"].error
    assert results["ok"].error is None and results["ok"].completions
    assert results["ok_array"].completions == results["ok"].completions


def test_t5_refuses_float16(tmp_path_factory):
    with pytest.raises(ValueError, match="T5 overflows in float16; use bfloat16 or float32"):
        load_model(untrained("t5", tmp_path_factory).path, device="cpu", dtype="float16")


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(UnsupportedModelError) as e:
        load_model(tmp_path, device="cpu")
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg
    for arch in (
        "BartForConditionalGeneration",
        "MarianMTModel",
        "T5ForConditionalGeneration",
        "MT5ForConditionalGeneration",
        "WhisperForConditionalGeneration",
    ):
        assert arch in msg


@pytest.mark.slow  # trains the tiny model on first use
@pytest.mark.parametrize("absorbed", [False, True], ids=["kv", "absorbed"])
@pytest.mark.parametrize("name", NAMES)
def test_beam_search_parity_with_transformers(name, absorbed, tiny_text_model):
    """num_beams 4, length_penalty 2.0, no_repeat_ngram_size 3 and a min length: the same top
    hypothesis as transformers' generate, per request, run together through one engine."""
    tiny = tiny_text_model(name)
    tok = tiny.tokenizer()
    texts = sentences(7)[:12]
    hf = AutoModelForSeq2SeqLM.from_pretrained(tiny.path).eval()
    extra = {} if tiny.forced_bos_token_id is None else {"forced_bos_token_id": tiny.forced_bos_token_id}
    expected = []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding, exactly what each request sees
            ids = tok(text, return_tensors="pt").input_ids
            out = hf.generate(
                ids,
                num_beams=4,
                length_penalty=2.0,
                no_repeat_ngram_size=3,
                min_length=4,
                max_new_tokens=MAX_NEW_TOKENS,
                early_stopping=True,
                do_sample=False,
                decoder_start_token_id=tiny.decoder_start_token_id,
                eos_token_id=tiny.eos_token_id,
                pad_token_id=tiny.pad_token_id,
                **extra,
            )[0, 1:].tolist()
            expected.append(out[: out.index(tiny.eos_token_id)] if tiny.eos_token_id in out else out)
    params = SamplingParams(
        num_beams=4,
        length_penalty=2.0,
        no_repeat_ngram_size=3,
        min_new_tokens=3,
        max_new_tokens=MAX_NEW_TOKENS,
        early_stopping=True,
        stop_token_ids=(tiny.eos_token_id,),
        forced_tokens=tiny.forced_tokens,
    )
    engine = Engine(
        load_model(tiny.path, device="cpu"),
        num_blocks=400,
        block_size=4,
        max_num_seqs=16,
        absorb_cross=absorbed,
    )
    reqs = [Request(tok(t).input_ids, tiny.prompt_ids, params, i) for i, t in enumerate(texts)]
    got = {r.request_id: r.token_ids for r in engine.generate(reqs)}
    assert [got[i] for i in range(len(texts))] == expected
    assert len({tuple(e) for e in expected}) >= len(texts) * 0.8  # inputs give different outputs
    assert engine.blocks.num_free == engine.blocks.num_blocks
