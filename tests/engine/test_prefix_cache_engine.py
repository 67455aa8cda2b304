"""Automatic prefix caching in the engine (``EngineConfig.prefix_cache``): outputs identical with
the cache on and off for every family (greedy, beam search, seeded sampling), hits counted as
expected on inputs with duplicates, decoder prompt blocks shared, and eviction, preemption and
out-of-memory recovery under a small KV pool never changing a result. CPU, fp32, eager; the CUDA
path is covered in tests/gpu/test_engine_gpu.py."""

from __future__ import annotations

import random

import numpy as np
import pytest

from encdec_cli.engine import Engine, Request, SamplingParams
from tests.support.text_models import N_WORDS, single_thread
from tests.support.whisper_models import EOT, SOT, load_ours, random_whisper

PARAMS = {
    "greedy": dict(),
    "beam": dict(num_beams=3, num_return_sequences=2, logprobs=True),
    "sampled": dict(temperature=0.8, top_k=20, logprobs=True),
}


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def with_duplicates(items: list, seed: int = 0) -> list[tuple[int, object]]:
    """(source index, a copy of the item): every item once, then half of them again, some right
    after their original (admitted in the same step) and some at the end (after it finished)."""
    rng = random.Random(seed)
    out = []
    for i, x in enumerate(items):
        out.append((i, x))
        if i % 4 == 0:
            out.append((i, x))
    out += [(i, items[i]) for i in rng.sample(range(len(items)), len(items) // 4)]
    return [(i, x.copy() if hasattr(x, "copy") else list(x)) for i, x in out]


def text_requests(tiny, n_unique=12, kind="greedy", prompt_extra=0, seed=0) -> list[Request]:
    tok = tiny.tokenizer()
    rng = random.Random(seed)
    texts = [
        " ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(rng.randint(2, 12))) for _ in range(n_unique)
    ]
    extra = [tok.convert_tokens_to_ids(f"w{i}") for i in range(prompt_extra)]
    reqs = []
    for n, (i, ids) in enumerate(with_duplicates([tok(t).input_ids for t in texts], seed)):
        p = SamplingParams(
            max_new_tokens=6 + i % 7,
            stop_token_ids=(tiny.eos_token_id,),
            forced_tokens=() if extra else tiny.forced_tokens,
            seed=i if kind == "sampled" else None,  # duplicates sample the same tokens
            **PARAMS[kind],
        )
        reqs.append(Request(ids, tiny.prompt_ids + extra, p, n))
    return reqs


def outputs(engine: Engine, reqs: list[Request]) -> dict:
    out = {}
    for r in engine.generate(reqs):
        out[r.request_id] = (
            [(c.token_ids, c.logprobs, c.score, c.finish_reason) for c in r.completions],
            r.first_step_probs,
            r.error,
        )
    assert sorted(out) == sorted(r.request_id for r in reqs)
    return out


def same(got: dict, want: dict) -> None:
    """Tokens, finish reasons and errors identical; log-probabilities and scores equal up to float
    rounding (a request's batch neighbours differ between runs, which moves the last bits)."""
    assert got.keys() == want.keys()
    for rid in want:
        (g, gp, ge), (w, wp, we) = got[rid], want[rid]
        assert [(c[0], c[3]) for c in g] == [(c[0], c[3]) for c in w], rid
        for gc, wc in zip(g, w):
            assert gc[2] == pytest.approx(wc[2], rel=1e-4, abs=1e-5)
            if wc[1] is not None:
                assert gc[1] == pytest.approx(wc[1], rel=1e-4, abs=1e-5)
        assert gp == pytest.approx(wp, rel=1e-4, abs=1e-6) and ge == we


def on_and_off(loaded, reqs, **cfg):
    results, stats = {}, {}
    for on in (False, True):
        engine = Engine(loaded, prefix_cache=on, **cfg)
        results[on] = outputs(engine, reqs)
        stats[on] = engine.stats
    same(results[True], results[False])
    assert stats[False].prefix_cache_hits == stats[False].prefix_cache_misses == 0
    return stats[True]


@pytest.mark.parametrize("kind", list(PARAMS))
@pytest.mark.parametrize("family", ["bart", "t5"])
def test_text_on_off_identical_and_hits_counted(tiny_text_model, family, kind):
    from encdec_models.loading import load_model

    tiny = tiny_text_model(family)
    loaded = load_model(tiny.path, device="cpu", dtype="float32")
    reqs = text_requests(tiny, kind=kind)
    unique = len({tuple(r.encoder_input) for r in reqs})
    stats = on_and_off(loaded, reqs, block_size=4, num_blocks=600, max_num_seqs=8)
    assert stats.preemptions == 0 and stats.prefix_cache_evictions == 0
    assert (stats.prefix_cache_misses, stats.prefix_cache_hits) == (unique, len(reqs) - unique)
    assert stats.encoder_seconds_saved > 0


def test_decoder_prompt_blocks_shared(bart_cpu):
    """Requests with the same source and a 10-token decoder prompt share its two full blocks once
    the first one's prompt is written; outputs unchanged."""
    tiny, loaded = bart_cpu
    reqs = text_requests(tiny, prompt_extra=9)
    stats = on_and_off(loaded, reqs, block_size=4, num_blocks=600, max_num_seqs=4)
    assert stats.prefix_cache_prompt_tokens > 0 and stats.prefix_cache_prompt_tokens % 8 == 0


@pytest.mark.parametrize("num_blocks", [24, 40])
def test_small_pool_eviction_and_preemption(bart_cpu, num_blocks):
    """A pool too small for everything: cached entries are evicted (and running requests
    preempted) all along; no result changes, nothing fails."""
    tiny, loaded = bart_cpu
    reqs = text_requests(tiny, n_unique=20, kind="beam") + text_requests(tiny, n_unique=20, seed=1)
    for n, r in enumerate(reqs):
        r.request_id = n
    stats = on_and_off(loaded, reqs, block_size=4, num_blocks=num_blocks, max_num_seqs=8)
    assert stats.prefix_cache_evictions > 0 and stats.prefix_cache_hits > 0


def test_out_of_memory_recovery_with_the_cache(bart_cpu):
    """A step that fails (out of device memory, injected) forgets the cache entries it registered
    and had not written: the recomputed requests still give the results of an engine without
    the cache and without failures."""
    tiny, loaded = bart_cpu
    reqs = text_requests(tiny, n_unique=16)
    want = outputs(Engine(loaded, prefix_cache=False, block_size=4, num_blocks=600, max_num_seqs=8), reqs)
    engine = Engine(loaded, block_size=4, num_blocks=600, max_num_seqs=8)
    engine.runner.fail_at_calls = {1, 4, 9}  # the first encoder run among them
    same(outputs(engine, reqs), want)
    assert engine.stats.oom_recoveries == 3 and engine.stats.prefix_cache_hits > 0


@pytest.fixture(scope="module")
def whisper_cpu(tmp_path_factory):
    path = tmp_path_factory.mktemp("whisper-prefix")
    random_whisper(path, seed=3)
    return load_ours(path)


def whisper_requests(kind="greedy", n_unique=6, prompt=(SOT,)) -> list[Request]:
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(rng.integers(4000, 40000)).astype(np.float32) * 0.1 for _ in range(n_unique)]
    reqs = []
    for n, (i, w) in enumerate(with_duplicates(waves)):
        p = SamplingParams(
            max_new_tokens=8, stop_token_ids=(EOT,), seed=i if kind == "sampled" else None, **PARAMS[kind]
        )
        reqs.append(Request(w, list(prompt), p, n))
    return reqs


@pytest.mark.parametrize("absorb", [False, True], ids=["kv", "absorbed"])
@pytest.mark.parametrize("kind", list(PARAMS))
def test_whisper_on_off_identical(whisper_cpu, kind, absorb):
    reqs = whisper_requests(kind)
    unique = 6
    stats = on_and_off(whisper_cpu, reqs, block_size=16, num_blocks=2000, max_num_seqs=8, absorb_cross=absorb)
    assert (stats.prefix_cache_misses, stats.prefix_cache_hits) == (unique, len(reqs) - unique)


def test_whisper_fallback_and_small_pool(whisper_cpu):
    """The same window decoded again (a temperature fallback: greedy, then sampled) with a long
    prompt, under a pool of a few requests' cross blocks: evictions, hits, identical results."""
    prompt = (SOT, *range(10, 30))
    greedy, sampled = whisper_requests("greedy", 8, prompt), whisper_requests("sampled", 8, prompt)
    reqs = []
    for i, r in enumerate(greedy):  # each window's retry a few requests after its first decoding
        reqs.append(r)
        if i >= 3:
            reqs.append(sampled[i - 3])
            sampled[i - 3].request_id += 1000
    stats = on_and_off(whisper_cpu, reqs, block_size=16, num_blocks=400, max_num_seqs=4)
    assert stats.prefix_cache_evictions > 0 and stats.prefix_cache_hits > 0
    assert stats.prefix_cache_prompt_tokens > 0
