"""Beam search in the engine vs transformers' ``generate(num_beams=...)`` (fp32, CPU).

A random-weight Whisper whose EOS row is nudged so beams end at varied steps: finished hypotheses,
length-penalised scores and the three ``early_stopping`` rules all matter. Many requests run
together with fewer sequence slots than beams (continuous batching of beam groups), and a small
KV pool forces preemption; results must equal transformers' hypotheses, with scores, token for token.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.generation.utils import GenerationMixin

from encdec_cli.engine import Engine, Request, SamplingParams
from encdec_cli.engine import runner as runner_module
from encdec_cli.engine import sampling as sampling_module
from encdec_cli.tasks.generation import sampling_params_from_generation_config
from tests.support.whisper_models import EOT, SOT, load_ours, random_whisper

transformers.logging.set_verbosity_error()

N_REQUESTS = 8
NUM_BEAMS = 4
CROSS_BLOCKS = 1500 // 4  # one request's cross-attention K/V in blocks of 4 tokens
EOS_NUDGE = 30.0  # added to the EOS embedding row along the final norm's bias: EOS now and then
BASE = dict(num_beams=NUM_BEAMS, num_return_sequences=2, no_repeat_ngram_size=3, min_new_tokens=3)
CASES = {  # (early_stopping, length_penalty, max_new_tokens, extra)
    "early-true": (True, 2.0, 16, {}),
    "early-false": (False, 2.0, 16, {}),
    "never": ("never", 2.0, 16, {}),
    "short-pref-never": ("never", 0.5, 30, {"repetition_penalty": 1.3}),
    "short-pref-true": (True, 0.5, 30, {}),
    "forced-bos-eos": (False, 1.0, 16, {"forced_bos_token_id": 5, "forced_eos_token_id": EOT}),
}
SECOND_EOS = 463  # a token the model emits often: with EOT, 2 stop tokens and K = 3 * num_beams
MIXED = [  # (case, num_beams, eos_token_id) of request i: beam groups of different shapes in one engine
    ("early-true", 2, EOT),
    ("never", 3, EOT),
    ("early-false", 4, EOT),
    ("forced-bos-eos", 3, EOT),
    ("early-true", 4, [EOT, SECOND_EOS]),
    ("never", 2, EOT),
    ("short-pref-never", 2, EOT),
    ("short-pref-true", 3, [EOT, SECOND_EOS]),
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: much faster than two contending threads on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    path = tmp_path_factory.mktemp("beam-whisper")
    hf = random_whisper(path)
    with torch.no_grad():
        bias = hf.model.decoder.layer_norm.bias
        hf.model.decoder.embed_tokens.weight[EOT] += EOS_NUDGE * bias / bias.norm()  # tied lm head
    hf.save_pretrained(path)
    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(80, 3000, generator=g) for _ in range(N_REQUESTS)]
    return hf, load_ours(path), feats


def _kwargs(case: str, **gen) -> dict:
    """transformers' generate() arguments of a case (``gen``: further or replaced arguments)."""
    early, lp, max_new, extra = CASES[case]
    return dict(BASE, early_stopping=early, length_penalty=lp, max_new_tokens=max_new, **extra) | gen


def _params(case: str, gen: dict | None = None, **overrides) -> SamplingParams:
    """The same case as engine SamplingParams (through the generation-config mapping)."""
    config = transformers.GenerationConfig(**{"eos_token_id": EOT, **_kwargs(case, **(gen or {}))})
    return sampling_params_from_generation_config(config, prompt_len=1, overrides=overrides)


_HF_CACHE: dict[str, list] = {}


def _hf_hypotheses(hf, feat, kwargs: dict) -> list[tuple[list[int], str, float]]:
    """transformers' hypotheses for one input: (tokens without EOS, finish reason, score), best first."""
    eos = kwargs.get("eos_token_id", EOT)
    stops = set(eos) if isinstance(eos, list) else {eos}
    out = GenerationMixin.generate(
        hf,
        input_features=feat[None],
        decoder_input_ids=torch.tensor([[SOT]]),
        return_dict_in_generate=True,
        output_scores=True,
        **kwargs,
    )
    hyps = []
    for seq, score in zip(out.sequences[:, 1:].tolist(), out.sequences_scores.tolist(), strict=True):
        end = next((i for i, t in enumerate(seq) if t in stops), None)  # padded after the end
        hyps.append((seq, "length", score) if end is None else (seq[:end], "stop", score))
    return hyps


def _reference(whisper, case: str) -> list[list[tuple[list[int], str, float]]]:
    """transformers' hypotheses per request of a case."""
    if case not in _HF_CACHE:
        hf, _, feats = whisper
        _HF_CACHE[case] = [_hf_hypotheses(hf, f, _kwargs(case)) for f in feats]
    return _HF_CACHE[case]


def _run(loaded, feats, params, num_blocks, max_num_seqs=10, extra=()):
    engine = Engine(loaded, num_blocks=num_blocks, block_size=4, max_num_seqs=max_num_seqs)
    copies = []
    copy_blocks = engine.runner.copy_blocks
    engine.runner.copy_blocks = lambda c: (copies.extend(c), copy_blocks(c))
    reqs = [Request(f, [SOT], params, i) for i, f in enumerate(feats)] + list(extra)
    out = {r.request_id: r for r in engine.generate(reqs)}
    assert all(r.error is None for r in out.values()), [r.error for r in out.values()]
    assert len(out) == len(reqs)
    assert engine.blocks.num_free == engine.blocks.num_blocks  # nothing leaked
    return engine, out, copies


def _assert_same(result, ref):
    got = [(c.token_ids, c.finish_reason) for c in result.completions]
    assert got == [(t, r) for t, r, _ in ref]
    for c, (_, _, score) in zip(result.completions, ref, strict=True):
        assert c.score == pytest.approx(score, abs=1e-4)
    assert [c.score for c in result.completions] == sorted(
        (c.score for c in result.completions), reverse=True
    )


@pytest.fixture
def device_forks(monkeypatch):
    """Counts the block copies of beam steps launched ahead (forks made on the device)."""
    counts = []
    copy = runner_module.encdec_kernels.copy_blocks_where

    def spy(pool, src, dst, mask):
        counts.append(int(mask.sum()))
        return copy(pool, src, dst, mask)

    monkeypatch.setattr(runner_module.encdec_kernels, "copy_blocks_where", spy)
    return counts


@pytest.fixture
def device_ngrams(monkeypatch):
    """Counts the n-gram rule's runs on the device (beam steps launched ahead carry their rows'
    tokens there)."""
    calls = []
    bans = sampling_module.ngram_bans_on_device

    def spy(logits, history, rows, n):
        calls.append(len(rows))
        return bans(logits, history, rows, n)

    monkeypatch.setattr(sampling_module, "ngram_bans_on_device", spy)
    return calls


@pytest.mark.parametrize("case", list(CASES))
def test_beam_search_matches_transformers(whisper, case, device_forks, device_ngrams):
    _, loaded, feats = whisper
    ref = _reference(whisper, case)
    assert "stop" in {r for hyps in ref for _, r, _ in hyps}  # EOS-finished hypotheses are ranked

    params = _params(case)
    # 8 requests x 4 beams through 10 sequence slots: beam groups come and go (continuous batching)
    engine, out, copies = _run(loaded, feats, params, num_blocks=N_REQUESTS * (CROSS_BLOCKS + 40))
    assert copies  # beams shared their prefix blocks and copied a block before writing into it
    assert engine.scheduler.num_preemptions == 0
    # most steps chose their beams on the device and launched the next step ahead, forking there
    assert engine.stats.ahead_steps > engine.stats.steps // 3 and sum(device_forks) > 0
    assert len(device_ngrams) > engine.stats.ahead_steps // 2  # their no_repeat_ngram_size 3 ran there
    for i in range(N_REQUESTS):
        _assert_same(out[i], ref[i])


def test_beam_steps_ahead_under_preemption(whisper, device_forks):
    """A pool for about two requests at a time: steps launched ahead (when the pool has a block
    for every child that may need one) alternate with steps that preempt; the same hypotheses,
    and the pool is whole at the end (the reserved blocks all came back)."""
    _, loaded, feats = whisper
    case = "short-pref-never"
    ref = _reference(whisper, case)
    engine, out, _ = _run(loaded, feats, _params(case), num_blocks=2 * CROSS_BLOCKS + 24)
    assert engine.scheduler.num_preemptions > 0
    assert engine.stats.ahead_steps > 0 and sum(device_forks) > 0
    for i in range(N_REQUESTS):
        _assert_same(out[i], ref[i])


def test_reference_cases_discriminate(whisper):
    """The cases exercise what they claim: outputs differ between inputs, hypotheses end on EOS
    and on the length limit, and the three early_stopping rules give different results."""
    refs = {case: _reference(whisper, case) for case in CASES}
    assert len({tuple(hyps[0][0]) for hyps in refs["never"]}) == N_REQUESTS
    reasons = [r for ref in refs.values() for hyps in ref for _, r, _ in hyps]
    assert reasons.count("stop") > 10 and reasons.count("length") > 10
    tops = {case: [hyps[0][0] for hyps in refs[case]] for case in ("early-true", "early-false", "never")}
    assert tops["early-true"] != tops["early-false"] and tops["early-false"] != tops["never"]


def test_beam_search_under_preemption_with_greedy_neighbours(whisper):
    """A pool for two requests at a time forces preemption (recompute); beams, their logprobs and
    greedy requests in the same steps are unaffected."""
    hf, loaded, feats = whisper
    case = "never"
    ref = _reference(whisper, case)
    params = _params(case, logprobs=True)
    greedy = SamplingParams(max_new_tokens=12, stop_token_ids=(EOT,))
    extra = [Request(feats[i], [SOT], greedy, ("greedy", i)) for i in range(2)]
    engine, out, _ = _run(loaded, feats, params, num_blocks=2 * CROSS_BLOCKS + 10, extra=extra)
    assert engine.scheduler.num_preemptions > 0
    for i in range(N_REQUESTS):
        _assert_same(out[i], ref[i])
        for c in out[i].completions:
            assert len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)
            if c.finish_reason == "length":  # score = sum of the chosen tokens' log-probs / length ** lp
                assert c.score == pytest.approx(sum(c.logprobs) / len(c.token_ids) ** 2.0, abs=1e-5)
    for i in range(2):
        want = hf.generate(
            input_features=feats[i][None],
            decoder_input_ids=torch.tensor([[SOT]]),
            max_new_tokens=12,
            num_beams=1,
            do_sample=False,
        )[0].tolist()
        want = want[1:] if want[:1] == [SOT] else want
        want = want[: want.index(EOT)] if EOT in want else want
        assert out[("greedy", i)].token_ids == want


def test_mixed_beam_searches_in_one_engine(whisper, monkeypatch):
    """Requests with 2, 3 and 4 beams, different length penalties, early_stopping rules and EOS
    counts (K = 2N or 3N) are stepped together; each equals transformers' search run alone."""
    hf, loaded, feats = whisper
    step_shapes = []  # per engine step: the (num_beams, stop tokens) of the requests stepped
    beam_launch = sampling_module.beam_launch

    def spy(groups, *args):
        step_shapes.append({(g.params.num_beams, len(g.params.stop_token_ids)) for g in groups})
        return beam_launch(groups, *args)

    monkeypatch.setattr(sampling_module, "beam_launch", spy)
    reqs, refs = [], []
    for i, (case, num_beams, eos) in enumerate(MIXED):
        gen = dict(num_beams=num_beams, eos_token_id=eos)
        reqs.append(Request(feats[i], [SOT], _params(case, gen, logprobs=i % 2 == 0), i))
        refs.append(_hf_hypotheses(hf, feats[i], _kwargs(case, **gen)))
    _, out, _ = _run(
        loaded, [], None, num_blocks=N_REQUESTS * (CROSS_BLOCKS + 40), max_num_seqs=24, extra=reqs
    )
    assert max(map(len, step_shapes)) == 5  # (2, 1), (3, 1), (3, 2), (4, 1), (4, 2) in one step
    for i, ref in enumerate(refs):
        _assert_same(out[i], ref)
        assert all((c.logprobs is not None) == (i % 2 == 0) for c in out[i].completions)
