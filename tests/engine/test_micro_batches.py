"""Two micro-batches (``EngineConfig.micro_batches``): steps alternate between two cohorts of the
running requests, one cohort's host part (beam bookkeeping, sampled tokens) finishing after the
other cohort's step is launched. On the CPU nothing overlaps, but the same code runs: the results
must be those of whole steps, with requests arriving mid-run, admissions joining the lighter cohort
and preemption in a small KV pool: the same tokens and finish reasons, and the same scores and
log-probabilities up to float32 rounding. Only rounding: a decode step of other rows (half the
batch) runs its matmuls with other blocking, so a row's logits may move in the last bits, exactly
as whole steps with another ``max_num_seqs`` do (``test_batch_composition_alone_moves_the_last_bits``);
and a request preempted at another step recomputes its tokens in one pass.
CPU, fp32, the eager path; CUDA with graphs: tests/gpu/test_engine_gpu.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from encdec_cli.engine import Engine, EngineConfig, Request, SamplingParams
from encdec_models.loading import load_model
from tests.support.text_models import random_text_requests, single_thread
from tests.support.whisper_models import EOT, SOT, load_ours, random_whisper


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


BEAM = dict(num_beams=4, no_repeat_ngram_size=3, length_penalty=2.0, num_return_sequences=2, logprobs=True)
GREEDY_IDS = 1000  # request ids of the greedy neighbours
SAMPLED = dict(temperature=0.9, top_k=20, top_p=0.9, logprobs=True)


def text_requests(tiny, tok, n, **params) -> list[Request]:
    """Beam searches (or sampled requests) of different input and output lengths, a third as many
    greedy requests with the no-repeat rule beside them; seeds for the sampled ones."""
    beams = random_text_requests(tiny, tok, n, 0, **params)
    greedy = random_text_requests(tiny, tok, n // 3, 1, no_repeat_ngram_size=2)
    out = []
    for r in beams:
        p = dataclasses.replace(r.params, seed=100 + r.request_id) if r.params.temperature else r.params
        # every fifth input repeats the one before: the prefix cache shares its encoder run
        source = out[-1].encoder_input if r.request_id % 5 == 4 else r.encoder_input
        out.append(Request(source, r.prompt_ids, p, r.request_id))
    for r in greedy:
        out.append(Request(r.encoder_input, r.prompt_ids, r.params, GREEDY_IDS + r.request_id))
    return out


def run(loaded, reqs, micro_batches, stream=True, **cfg):
    engine = Engine(loaded, micro_batches=micro_batches, **{"block_size": 4, "max_num_seqs": 24, **cfg})

    def source():  # a streaming source: now and then nothing is ready yet (requests arrive mid-run)
        for i, r in enumerate(reqs):
            if stream and i % 4 == 1:
                yield None
            yield r

    out = {}
    for r in engine.generate(source()):
        assert r.error is None, r.error
        out[r.request_id] = [(c.token_ids, c.finish_reason, c.score, c.logprobs) for c in r.completions]
    assert sorted(out) == sorted(r.request_id for r in reqs)
    assert engine.blocks.num_free == engine.blocks.num_blocks  # nothing leaked
    return engine, out


def assert_same(got: dict, want: dict) -> None:
    """Tokens and finish reasons identical; scores and log-probabilities up to float32 rounding
    (the tolerance of tests/engine/test_beam.py against transformers). The score of a greedy
    neighbour (id >= GREEDY_IDS) that asks for no log-probabilities is not compared: it sums
    whatever log-probabilities its step's other rows had computed."""
    assert got.keys() == want.keys()
    for k in want:
        assert [c[:2] for c in got[k]] == [c[:2] for c in want[k]], k
        for g, w in zip(got[k], want[k], strict=True):
            if k < GREEDY_IDS or w[3] is not None:
                assert g[2] == pytest.approx(w[2], rel=1e-4, abs=1e-4), k
            assert (g[3] is None) == (w[3] is None), k
            if w[3] is not None:
                assert g[3] == pytest.approx(w[3], rel=1e-4, abs=1e-4), k


def check_same(loaded, reqs, **cfg):
    whole, want = run(loaded, reqs, 1, **cfg)
    split, got = run(loaded, reqs, 2, **cfg)
    assert_same(got, want)
    assert whole.stats.micro_batch_steps == 0
    assert split.stats.micro_batch_steps >= 10  # the path ran, many times
    assert split.stats.decode_rows == whole.stats.decode_rows
    assert split.stats.generated_tokens == whole.stats.generated_tokens
    assert split.stats.prefix_cache_hits > 0
    return whole, split


def _text_model(tiny_text_model, name):
    tiny = tiny_text_model(name)
    return tiny, load_model(tiny.path, device="cpu", dtype="float32")


@pytest.mark.parametrize("name", ["bart", "t5"])
@pytest.mark.parametrize("small_pool", [False, True], ids=["pool", "preemption"])
def test_beam_search_same_with_two_cohorts(tiny_text_model, name, small_pool):
    tiny, loaded = _text_model(tiny_text_model, name)
    reqs = text_requests(tiny, loaded.tokenizer, 18, **BEAM)
    whole, split = check_same(loaded, reqs, num_blocks=36 if small_pool else 600)
    if small_pool:
        assert split.scheduler.num_preemptions > 0
        assert whole.scheduler.num_preemptions > 0


@pytest.mark.parametrize("small_pool", [False, True], ids=["pool", "preemption"])
def test_seeded_sampling_same_with_two_cohorts(bart_cpu, small_pool):
    tiny, loaded = bart_cpu
    reqs = text_requests(tiny, loaded.tokenizer, 24, **SAMPLED)
    _, split = check_same(loaded, reqs, num_blocks=20 if small_pool else 600)
    if small_pool:
        assert split.scheduler.num_preemptions > 0


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    path = tmp_path_factory.mktemp("micro-whisper")
    hf = random_whisper(path)
    with torch.no_grad():  # EOS now and then, so beams end at varied steps
        bias = hf.model.decoder.layer_norm.bias
        hf.model.decoder.embed_tokens.weight[EOT] += 30.0 * bias / bias.norm()
    hf.save_pretrained(path)
    return load_ours(path)


def test_whisper_beam_search_same_with_two_cohorts(whisper):
    g = torch.Generator().manual_seed(5)
    reqs = []
    for i in range(7):
        p = SamplingParams(
            max_new_tokens=6 + 3 * i,
            min_new_tokens=2,
            stop_token_ids=(EOT,),
            num_beams=4 if i % 3 else 1,
            no_repeat_ngram_size=3,
            length_penalty=1.0 + 0.5 * (i % 2),
            num_return_sequences=2 if i % 3 else 1,
            logprobs=True,
        )
        feat = reqs[2].encoder_input if i == 5 else torch.randn(80, 3000, generator=g)  # a cache hit
        reqs.append(Request(feat, [SOT], p, i))
    cross = 1500 // 4  # a request's cross blocks (blocks of 4)
    check_same(whisper, reqs, max_num_seqs=16, num_blocks=7 * (cross + 40))
    _, split = check_same(whisper, reqs, max_num_seqs=16, num_blocks=2 * cross + 10)
    assert split.scheduler.num_preemptions > 0


def test_cohorts_stay_balanced_and_fall_back(bart_cpu):
    """Admissions join the lighter cohort; one request alone runs whole steps."""
    tiny, loaded = bart_cpu
    reqs = text_requests(tiny, loaded.tokenizer, 12, **BEAM)
    engine = Engine(loaded, micro_batches=2, block_size=4, max_num_seqs=24, num_blocks=600)
    loads = []
    sched = engine.scheduler
    sched.schedule = _spy(sched.schedule, lambda: loads.append(sched.cohort_seqs()))
    list(engine.generate(reqs))
    assert max(abs(a - b) for a, b in loads[:3]) <= 4  # a beam search's 4 sequences at most apart
    one, _ = run(loaded, reqs[:1], 2)
    assert one.stats.micro_batch_steps == 0


def _spy(fn, after):
    def wrapped(*a, **k):
        out = fn(*a, **k)
        after()
        return out

    return wrapped


def test_out_of_memory_with_a_step_in_flight(bart_cpu):
    """Out of memory in one cohort's step while the other's is pending: the pending step's host part
    runs first (its tokens kept), then every request recomputes; the results are the same."""
    tiny, loaded = bart_cpu
    reqs = text_requests(tiny, loaded.tokenizer, 12, **BEAM)
    _, want = run(loaded, reqs, 1, num_blocks=600)
    engine = Engine(loaded, micro_batches=2, block_size=4, max_num_seqs=24, num_blocks=600)
    pending_at_oom = []
    recover = engine._recover_from_oom
    engine._recover_from_oom = lambda e: (pending_at_oom.append(engine._pending is not None), recover(e))[1]
    engine.runner.fail_at_calls = {12, 30}  # decode calls of micro-batch steps
    got = {}
    for r in engine.generate(reqs):
        assert r.error is None, r.error
        got[r.request_id] = [(c.token_ids, c.finish_reason, c.score, c.logprobs) for c in r.completions]
    assert engine.stats.oom_recoveries == 2
    assert pending_at_oom == [True, True]
    assert_same(got, want)
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_batch_composition_alone_moves_the_last_bits(bart_cpu):
    """Why the scores compare up to rounding: whole steps of at most 12 sequences instead of 24
    already move some scores in their last bits (same tokens)."""
    tiny, loaded = bart_cpu
    reqs = text_requests(tiny, loaded.tokenizer, 18, **BEAM)
    _, wide = run(loaded, reqs, 1, num_blocks=600)
    _, narrow = run(loaded, reqs, 1, num_blocks=600, max_num_seqs=12)
    assert_same(narrow, wide)
    assert narrow != wide  # not bit-identical: a tolerance is needed, and this is its size


def test_default_is_whole_steps(bart_cpu):
    """The default is one cohort: whole steps; two split beam-search and sampled steps."""
    tiny, loaded = bart_cpu
    for params in (SAMPLED, BEAM):
        for mb in (None, 2):
            cfg = {} if mb is None else {"micro_batches": mb}
            engine = Engine(loaded, block_size=4, max_num_seqs=24, num_blocks=600, **cfg)
            list(engine.generate(text_requests(tiny, loaded.tokenizer, 9, **params)))
            assert (engine.stats.micro_batch_steps > 0) == (mb == 2)


def test_profiled_phases_and_close(bart_cpu):
    """With profiling on, micro-batch steps time their phases; close() drops a pending step."""
    tiny, loaded = bart_cpu
    engine = Engine(loaded, micro_batches=2, profile=True, block_size=4, max_num_seqs=24, num_blocks=600)
    list(engine.generate(text_requests(tiny, loaded.tokenizer, 9, **BEAM)))
    stats = engine.stats
    assert stats.micro_batch_steps > 0
    assert {"schedule", "encode", "decode", "sample"} <= set(stats.phase_seconds)
    for r in text_requests(tiny, loaded.tokenizer, 3, **BEAM):
        engine.scheduler.add(engine._admit(r))
    while engine._pending is None:
        engine.step()
    engine.close()
    assert engine._pending is None


def test_an_engine_collected_unclosed_lets_the_model_go_of_its_pool(bart_cpu):
    """The model's layers hold views of the engine's KV pool. An engine dropped without close()
    releases them when it is collected (on a GPU the next engine on another model could otherwise
    not size its pool: the image-to-text GPU test's third engine found 70 GiB still held)."""
    import gc
    import weakref

    from tests.engine.test_speculative import text_requests

    tiny, loaded = bart_cpu
    engine = Engine(loaded, block_size=4, max_num_seqs=8, num_blocks=300)
    list(engine.generate(text_requests(tiny, loaded.tokenizer, 3)))
    attn = loaded.model.decoder_layers()[0].self_attn
    pool = weakref.ref(engine.runner.pool)
    assert attn.k_cache is not None and attn.k_cache.untyped_storage().data_ptr() == pool().data_ptr()
    del engine
    gc.collect()
    assert attn.k_cache is None and pool() is None
    # closed first: the finalizer has nothing left to do, and a closed engine is collected as well
    engine = Engine(loaded, block_size=4, max_num_seqs=8, num_blocks=300)
    list(engine.generate(text_requests(tiny, loaded.tokenizer, 2)))
    engine.close()
    assert attn.k_cache is None
    del engine
    gc.collect()


def test_micro_batches_config():
    with pytest.raises(ValueError, match="micro_batches"):
        EngineConfig(micro_batches=3)
    with pytest.raises(ValueError, match="pipeline"):
        EngineConfig(micro_batches=2, pipeline_parallel=2)
    assert EngineConfig(micro_batches=2, speculative="ngram").micro_batches == 2  # built together
