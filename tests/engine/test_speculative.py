"""Speculative decoding (engine/speculative.py): greedy outputs token-identical to plain decoding for
every family and every kind of draft (prompt lookup, a draft model, the oracle), with preemption and
with requests arriving mid-run; sampled outputs with the plain sampler's distribution. CPU, float32,
the eager path (the CUDA-graph path: tests/gpu/test_speculative_gpu.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from encdec_cli.engine import (
    Engine,
    OracleDrafter,
    Request,
    SamplingParams,
    SpeculativeSpec,
    parse_speculative,
)
from encdec_cli.engine.speculative import Draft, NgramDrafter, speculative_sample
from encdec_models.loading import load_model
from tests.support.text_models import random_text_requests, single_thread
from tests.support.whisper_models import EOT, SOT, discriminating_init_, load_ours, random_whisper


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def text_requests(tiny, tok, n=24, seed=0, **params) -> list[Request]:
    return random_text_requests(tiny, tok, n, seed, (2, 12), (4, 20), (0, 0, 3), **params)


def run(loaded, reqs, stream=False, drafter=None, **cfg):
    engine = Engine(loaded, drafter=drafter, **{"block_size": 4, "num_blocks": 400, "max_num_seqs": 8, **cfg})

    def source():  # a streaming source: now and then nothing is ready yet (requests arrive mid-run)
        for i, r in enumerate(reqs):
            if stream and i % 3 == 0:
                yield None
            yield r

    results = list(engine.generate(source()))
    assert sorted(r.request_id for r in results) == [r.request_id for r in reqs]
    assert not [r.error for r in results if r.error]
    return engine, {r.request_id: (r.token_ids, r.finish_reason, r.error) for r in results}, results


def oracle_for(want: dict, vocab: int, alpha: float = 0.7, k: int = 4) -> OracleDrafter:
    return OracleDrafter({rid: toks for rid, (toks, _, _) in want.items()}, alpha, k, vocab, seed=1)


# ---- parsing ---------------------------------------------------------------------------------------


def test_parse_speculative():
    assert parse_speculative(None) is None and parse_speculative("off") is None
    assert parse_speculative("ngram") == SpeculativeSpec("ngram", 4)
    assert parse_speculative("ngram:7") == SpeculativeSpec("ngram", 7)
    assert parse_speculative("model:/m/draft") == SpeculativeSpec("model", 4, "/m/draft")
    assert parse_speculative("model:/m/draft:2") == SpeculativeSpec("model", 2, "/m/draft")
    assert parse_speculative("model:C:/m/x") == SpeculativeSpec("model", 4, "C:/m/x")
    for bad in ("ngram:0", "ngram:x", "model:", "lookup", "ngram:99"):
        with pytest.raises(ValueError, match="speculative"):
            parse_speculative(bad)


def test_prompt_lookup_finds_the_source_and_its_own_output():
    class G:  # the two fields the drafter reads
        def __init__(self, enc):
            self.request = Request(enc, [0])

    class S:
        def __init__(self, group, tokens):
            self.group, self.tokens = group, tokens

    d = NgramDrafter(k=3)
    g = G([5, 6, 7, 8, 9, 6, 7, 1])
    # the last token 6 first occurs in the encoder input at 1, followed by 7 8 9
    assert d.propose([S(g, [0, 4, 6])], [5])[0].tokens == [7, 8, 9]
    # a longer match wins: "9 6" -> 7 1 (the encoder's second occurrence of 6)
    assert d.propose([S(g, [0, 9, 6])], [5])[0].tokens == [7, 1]
    assert d.propose([S(g, [0, 9, 6])], [1])[0].tokens == [7]  # room
    # the decoder's own tokens: 3 4 occurs earlier, followed by 2 3
    g2 = G([100, 101])
    assert d.propose([S(g2, [0, 3, 4, 2, 3, 4])], [5])[0].tokens == [2, 3, 4]
    assert d.propose([S(g2, [0, 50])], [5])[0] is None
    assert NgramDrafter(3, encoder_ids=False).propose([S(G([5, 6, 7]), [0, 5])], [5])[0] is None


# ---- greedy: token-identical to plain decoding ------------------------------------------------------

FAMILIES = ["bart", "mbart", "marian", "t5", "t5_v1_1"]


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_text_families_all_drafters(tiny_text_model, name):
    tiny = tiny_text_model(name)
    loaded = load_model(tiny.path, device="cpu", dtype="float32")
    reqs = text_requests(tiny, loaded.tokenizer)
    plain, want, _ = run(loaded, reqs)
    assert any(reason == "stop" for _, reason, _ in want.values())
    assert plain.stats.draft_tokens == 0 and plain.stats.tokens_per_step == 1.0
    for kind in ("ngram:4", f"model:{tiny.path}:3", "oracle"):
        drafter = oracle_for(want, loaded.model.vocab_size) if kind == "oracle" else None
        spec = None if kind == "oracle" else kind
        engine, got, results = run(loaded, reqs, drafter=drafter, speculative=spec)
        assert got == want, kind
        st = engine.stats
        assert st.verify_steps > 0 and st.draft_tokens > 0 and st.accepted_tokens > 0, kind
        assert st.tokens_per_step > 1.0, kind
        # verification steps run ahead where the drafter drafts ahead (the oracle); the others
        # draft on the host from each step's tokens
        assert (engine.stats.ahead_steps > 0) == (kind == "oracle"), kind
        assert st.generated_tokens == sum(r.metrics["generated_tokens"] for r in results)
        assert sum(r.metrics["accepted_tokens"] for r in results) == st.accepted_tokens
        if kind.startswith("model"):  # the target as its own draft: its encoder output is reused
            assert engine.speculator.drafter.shares_encoder
            assert st.acceptance_rate == 1.0


@pytest.mark.parametrize(
    "cfg,stream",
    [({}, True), ({"num_blocks": 14}, False), ({"num_blocks": 14}, True)],
    ids=["arrivals", "preemption", "preemption+arrivals"],
)
def test_greedy_with_preemption_and_arrivals(bart_cpu, tmp_path, cfg, stream):
    tiny, loaded = bart_cpu
    reqs = text_requests(tiny, loaded.tokenizer, n=30, seed=3)
    plain, want, _ = run(loaded, reqs, stream, **cfg)
    small = small_text_draft(tiny, tmp_path)
    for kind in ("ngram:3", f"model:{tiny.path}:4", f"model:{small}:2", "oracle"):
        drafter = oracle_for(want, loaded.model.vocab_size, alpha=0.5) if kind == "oracle" else None
        spec = None if kind == "oracle" else kind
        engine, got, _ = run(loaded, reqs, stream, drafter=drafter, **cfg, speculative=spec)
        assert got == want, kind
        assert engine.stats.draft_tokens > 0, kind
        if "num_blocks" in cfg:
            assert engine.scheduler.num_preemptions > 0, kind
        assert engine.num_free_blocks == engine.num_blocks  # every slot came back, rejected drafts too
        if kind.startswith("model"):
            drafter = engine.speculator.drafter
            assert drafter.blocks.num_free == drafter.blocks.num_blocks
            assert drafter.shares_encoder == (str(small) not in kind)


def small_text_draft(tiny, tmp_path):
    """A smaller random-weight model of the same family with the same tokenizer (its own encoder)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    path = tmp_path / "draft"
    if not (path / "config.json").exists():
        cfg = AutoConfig.from_pretrained(tiny.path)
        cfg.decoder_layers, cfg.encoder_layers = 1, 1
        torch.manual_seed(5)
        AutoModelForSeq2SeqLM.from_config(cfg).save_pretrained(path)
        AutoTokenizer.from_pretrained(tiny.path).save_pretrained(path)
    return path


def whisper_pair(tmp_path):
    """A random Whisper and a distil-style draft: the same encoder weights, a one-layer decoder of
    its own."""
    from transformers import WhisperForConditionalGeneration

    target = tmp_path / "whisper"
    hf = random_whisper(target)
    cfg = hf.config
    cfg.decoder_layers = 1
    draft = WhisperForConditionalGeneration(cfg).eval()
    discriminating_init_(draft, seed=9)
    draft.model.encoder.load_state_dict(hf.model.encoder.state_dict())
    draft.save_pretrained(tmp_path / "draft")
    return target, tmp_path / "draft"


def whisper_requests(n=10, seed=0, **params):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        wave = (torch.randn(16000 * rng.randint(1, 3), generator=g) * 0.1).numpy()
        p = SamplingParams(max_new_tokens=rng.randint(5, 30), stop_token_ids=(EOT,), **params)
        out.append(Request(wave, [SOT], p, i))
    return out


def test_greedy_whisper_all_drafters(tmp_path):
    target, draft = whisper_pair(tmp_path)
    loaded = load_ours(target)
    reqs = whisper_requests()
    cfg = {"block_size": 16, "num_blocks": 700}  # a window's cross cache takes 94 blocks: ~7 fit
    plain, want, _ = run(loaded, reqs, stream=True, **cfg)
    for kind in ("ngram:4", f"model:{draft}:3", f"model:{target}:4", "oracle"):
        drafter = oracle_for(want, loaded.model.vocab_size, alpha=0.9, k=8) if kind == "oracle" else None
        spec = None if kind == "oracle" else kind
        engine, got, _ = run(loaded, reqs, stream=True, drafter=drafter, speculative=spec, **cfg)
        assert got == want, kind
        if kind != "ngram:4":  # random weights: prompt lookup may find nothing worth proposing
            assert engine.stats.draft_tokens > 0, kind
        if kind.startswith(f"model:{target}") or kind == "oracle":  # a random draft agrees by chance only
            assert engine.stats.accepted_tokens > 0, kind
        if kind.startswith("model"):
            assert engine.speculator.drafter.shares_encoder  # distil-style: the target's encoder output


def test_beam_search_is_refused(bart_cpu):
    tiny, loaded = bart_cpu
    engine = Engine(loaded, speculative="ngram", num_blocks=100)
    req = Request([5, 6, 7], tiny.prompt_ids, SamplingParams(max_new_tokens=4, num_beams=2), "b")
    (res,) = engine.generate([req])
    assert res.error and "beam search cannot be combined with speculative decoding" in res.error


# ---- sampling: the distribution is unchanged ---------------------------------------------------------


def test_speculative_sampling_keeps_the_distribution():
    """Speculative sampling of one step: the first token emitted is distributed as p, whatever q the
    draft came from (a draft model's) or a fixed draft token (prompt lookup: q is a point mass)."""
    g = torch.Generator().manual_seed(0)
    vocab, n = 6, 20000
    p = torch.distributions.Dirichlet(torch.ones(vocab)).sample((3,)).float()  # [k + 1, V], k = 2
    q = torch.distributions.Dirichlet(torch.ones(vocab)).sample((2,)).float()
    sampler = torch.Generator().manual_seed(1)
    for kind in ("model", "point"):
        counts = np.zeros(vocab)
        second = np.zeros(vocab)
        for _ in range(n):
            if kind == "model":
                d = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(2)]
                draft = Draft(d, q)
            else:
                draft = Draft([2, 3])
            tokens, _ = speculative_sample(p, draft, sampler)
            counts[tokens[0]] += 1
            if len(tokens) > 1 and tokens[0] == draft.tokens[0]:
                second[tokens[1]] += 1
        expected = p[0].numpy() * n
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 20.5, (kind, chi2)  # 5 degrees of freedom: p = 0.001
        # given the first token was the draft's, the second is distributed as p[1]
        m = second.sum()
        exp2 = p[1].numpy() * m
        assert ((second - exp2) ** 2 / exp2).sum() < 20.5, kind


def chi2_quantile_999(dof: int) -> float:
    """The chi-square distribution's 0.999 quantile (Wilson-Hilferty; within 1% from 3 degrees of
    freedom on)."""
    z, a = 3.0902, 2 / (9 * dof)
    return dof * (1 - a + z * a**0.5) ** 3


def two_sample_chi2(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    keep = (a + b) >= 10  # pool the rare tokens into one cell
    a2 = np.append(a[keep], a[~keep].sum())
    b2 = np.append(b[keep], b[~keep].sum())
    if a2[-1] + b2[-1] == 0:
        a2, b2 = a2[:-1], b2[:-1]
    na, nb = a2.sum(), b2.sum()
    tot = a2 + b2
    ea, eb = tot * na / (na + nb), tot * nb / (na + nb)
    return float(((a2 - ea) ** 2 / ea).sum() + ((b2 - eb) ** 2 / eb).sum()), len(tot) - 1


def test_sampling_token_frequencies_match_plain_sampling(bart_cpu, tmp_path):
    """Many seeded sampled requests, plain vs speculative (prompt lookup, a draft model that samples,
    the oracle): the frequencies of the tokens at each of the first positions agree within sampling
    error (a chi-square two-sample test; seeded, so the same numbers every run)."""
    tiny, loaded = bart_cpu
    tok = loaded.tokenizer
    text = "w1 w2 w3 w4 w5 w6 w7"
    n, positions = 400, 5
    reqs = [
        Request(
            tok(text).input_ids,
            tiny.prompt_ids,
            SamplingParams(
                max_new_tokens=positions, temperature=1.3, seed=i, stop_token_ids=(tiny.eos_token_id,)
            ),
            i,
        )
        for i in range(n)
    ]

    def freqs(results):
        out = np.zeros((positions, loaded.model.vocab_size))
        for toks, _, _ in results.values():
            for j, t in enumerate(toks[:positions]):
                out[j, t] += 1
        return out

    cfg = {"max_num_seqs": 64, "num_blocks": 2000}
    _, plain, _ = run(loaded, reqs, **cfg)
    greedy_like = {rid: toks for rid, (toks, _, _) in plain.items()}
    base = freqs(plain)
    for kind in ("ngram:3", f"model:{small_text_draft(tiny, tmp_path)}:3", "oracle"):
        drafter = OracleDrafter(greedy_like, 0.8, 3, loaded.model.vocab_size) if kind == "oracle" else None
        engine, got, _ = run(
            loaded, reqs, drafter=drafter, speculative=None if kind == "oracle" else kind, **cfg
        )
        assert engine.stats.accepted_tokens > 0, kind
        assert got != plain  # other random draws: a different sample, the same distribution
        spec = freqs(got)
        for j in range(positions):
            stat, dof = two_sample_chi2(base[j], spec[j])
            assert stat < chi2_quantile_999(dof), (kind, j, stat, dof)
