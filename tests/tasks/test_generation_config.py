"""generation_config.json -> SamplingParams, and the decoder prompt; checked field by field and
against transformers' own logits processors step by step on a tiny random BART."""

from __future__ import annotations

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig

from encdec_cli.engine.sampling import process_logits
from encdec_cli.engine.sequence import Request, SamplingParams, SequenceGroup
from encdec_cli.tasks.generation import decoder_prompt, sampling_params_from_generation_config

# facebook/bart-large-cnn's generation_config.json
BART_CNN = dict(
    bos_token_id=0,
    decoder_start_token_id=2,
    early_stopping=True,
    eos_token_id=2,
    forced_bos_token_id=0,
    forced_eos_token_id=2,
    length_penalty=2.0,
    max_length=142,
    min_length=56,
    no_repeat_ngram_size=3,
    num_beams=4,
    pad_token_id=1,
)


def test_bart_cnn_config():
    p = sampling_params_from_generation_config(GenerationConfig(**BART_CNN), prompt_len=1)
    assert p.num_beams == 4 and p.length_penalty == 2.0 and p.early_stopping is True
    assert p.no_repeat_ngram_size == 3 and p.stop_token_ids == (2,)
    assert p.max_new_tokens == 141 and p.min_new_tokens == 55  # both lengths count the prompt
    assert p.forced_tokens == ((0, 0), (140, 2))  # BOS first, EOS at the last allowed index
    assert p.temperature == 0 and p.top_k == 0 and p.top_p == 1.0
    assert p.repetition_penalty == 1.0 and p.num_return_sequences == 1


def test_longer_prompt_shifts_lengths_and_drops_forced_bos():
    p = sampling_params_from_generation_config(GenerationConfig(**BART_CNN), prompt_len=3)
    assert p.max_new_tokens == 139 and p.min_new_tokens == 53
    assert p.forced_tokens == ((138, 2),)  # transformers forces BOS only right after a 1-token prompt


def test_new_token_forms_win_and_defaults():
    g = GenerationConfig(
        max_length=50, max_new_tokens=7, min_length=30, min_new_tokens=2, eos_token_id=[2, 5]
    )
    p = sampling_params_from_generation_config(g, prompt_len=4)
    assert (p.max_new_tokens, p.min_new_tokens, p.stop_token_ids) == (7, 2, (2, 5))
    p = sampling_params_from_generation_config(GenerationConfig(), prompt_len=1)
    assert p == SamplingParams()  # nothing set: the engine's defaults (up to the model's length limit)
    with pytest.raises(ValueError, match="max_length"):
        sampling_params_from_generation_config(GenerationConfig(max_length=3), prompt_len=3)


def test_sampling_fields():
    g = GenerationConfig(do_sample=False, temperature=0.7, top_k=5, top_p=0.5)
    p = sampling_params_from_generation_config(g, 1)
    assert (p.temperature, p.top_k, p.top_p) == (0.0, 0, 1.0)  # do_sample False: greedy
    p = sampling_params_from_generation_config(GenerationConfig(do_sample=True), 1)
    assert (p.temperature, p.top_k, p.top_p) == (1.0, 50, 1.0)  # transformers' sampling defaults
    p = sampling_params_from_generation_config(
        GenerationConfig(do_sample=True, temperature=0.6, top_k=0, top_p=0.9), 1
    )
    assert (p.temperature, p.top_k, p.top_p) == (0.6, 0, 0.9)


def test_token_lists():
    g = GenerationConfig(
        eos_token_id=2, suppress_tokens=[5, 6], begin_suppress_tokens=[7], bad_words_ids=[[8, 9], [2], [10]]
    )
    p = sampling_params_from_generation_config(g, 1)
    assert p.suppress_tokens == (5, 6) and p.begin_suppress_tokens == (7,)
    assert p.bad_words_ids == ((8, 9), (10,))  # a lone EOS is dropped, as transformers does
    with pytest.warns(UserWarning, match="begin_suppress_tokens"):
        p = sampling_params_from_generation_config(
            GenerationConfig(forced_bos_token_id=3, begin_suppress_tokens=[7]), 1
        )
    assert p.begin_suppress_tokens == () and p.forced_tokens == ((0, 3),)
    with pytest.warns(UserWarning, match="forced_eos_token_id"):
        p = sampling_params_from_generation_config(GenerationConfig(forced_eos_token_id=2), 1)
    assert p.forced_tokens == ()


def test_overrides():
    g = GenerationConfig(**BART_CNN)
    p = sampling_params_from_generation_config(g, 1, {"num_beams": None, "length_penalty": 1.0})
    assert p.num_beams == 4 and p.length_penalty == 1.0  # None keeps the config's value
    p = sampling_params_from_generation_config(
        g, 1, {"num_beams": 1, "early_stopping": False, "max_new_tokens": 20, "seed": 3, "logprobs": True}
    )
    assert (p.num_beams, p.early_stopping, p.max_new_tokens, p.seed, p.logprobs) == (1, False, 20, 3, True)
    assert p.forced_tokens == ((0, 0), (19, 2))
    # a temperature turns sampling on (with transformers' default top_k); 0 turns it off
    p = sampling_params_from_generation_config(GenerationConfig(), 1, {"temperature": 0.7})
    assert (p.temperature, p.top_k) == (0.7, 50)
    p = sampling_params_from_generation_config(GenerationConfig(do_sample=True), 1, {"temperature": 0})
    assert p.temperature == 0 and p.greedy
    # max_length / min_length overrides beat the config's *_new_tokens
    g = GenerationConfig(max_new_tokens=9, min_new_tokens=4)
    p = sampling_params_from_generation_config(g, 2, {"max_length": 30, "min_length": 3})
    assert (p.max_new_tokens, p.min_new_tokens) == (28, 1)
    with pytest.raises(ValueError, match="unknown generation option"):
        sampling_params_from_generation_config(g, 1, {"beams": 2})
    with pytest.raises(ValueError, match="sampling"):  # beam sampling is not supported
        sampling_params_from_generation_config(GenerationConfig(num_beams=2, do_sample=True), 1)


def test_decoder_prompt():
    cfg = BartConfig(decoder_start_token_id=2, bos_token_id=0)
    assert decoder_prompt(GenerationConfig(decoder_start_token_id=5), cfg) == [5]
    assert decoder_prompt(GenerationConfig(), cfg) == [2]
    assert decoder_prompt(GenerationConfig(bos_token_id=4), BartConfig(decoder_start_token_id=None)) == [4]
    bare = BartConfig(decoder_start_token_id=None, bos_token_id=None)
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        decoder_prompt(GenerationConfig(), bare)


def _tiny_bart() -> BartForConditionalGeneration:
    cfg = BartConfig(
        vocab_size=64,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    )
    torch.manual_seed(0)
    m = BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger weights: varied greedy tokens (see tests/support/whisper_models.py)
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 1 if "embed" in name or "shared" in name else 3 / p.shape[-1] ** 0.5)
    return m


@pytest.mark.parametrize(
    "fields, prompt",
    [
        (
            dict(
                min_length=6,
                max_length=14,
                forced_bos_token_id=7,
                forced_eos_token_id=2,
                no_repeat_ngram_size=2,
                repetition_penalty=1.3,
                suppress_tokens=[5, 6],
                bad_words_ids=[[8, 9], [10], [2]],
            ),
            [2],
        ),
        (
            dict(min_new_tokens=3, max_new_tokens=9, begin_suppress_tokens=[11, 12], no_repeat_ngram_size=1),
            [2, 0],
        ),
    ],
)
def test_processors_match_transformers(fields, prompt):
    """Our process_logits with the mapped params gives transformers' processed scores at every step."""
    m = _tiny_bart()
    gen = GenerationConfig(eos_token_id=2, decoder_start_token_id=2, pad_token_id=1, bos_token_id=0, **fields)
    out = m.generate(
        torch.tensor([[0, 20, 21, 22, 23, 2]]),
        decoder_input_ids=torch.tensor([prompt]),
        generation_config=gen,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    params = sampling_params_from_generation_config(gen, len(prompt))
    seq_tokens = out.sequences[0].tolist()
    assert len(out.scores) >= 3
    for t, (raw, processed) in enumerate(zip(out.logits, out.scores, strict=True)):
        group = SequenceGroup(Request(None, prompt, params), 1, params.max_new_tokens or 64, 0)
        group.seqs[0].tokens = seq_tokens[: len(prompt) + t]
        ours = process_logits(raw.clone().float(), group.seqs)
        assert torch.equal(torch.isinf(ours), torch.isinf(processed)), f"step {t}"
        fin = ~torch.isinf(processed)
        torch.testing.assert_close(ours[fin], processed[fin].float(), rtol=1e-6, atol=1e-6)
