"""Two micro-batches with speculative decoding (``EngineConfig.micro_batches`` 2 and a drafter): a
cohort's step may be a verification step, whose acceptance is launched on the device
(``Speculator.verify_launch``) before the other cohort's pending step finishes on the host, and
finished (``Speculator.verify_finish``, ``Engine._finish_verified``) in the next cohort step. Greedy
outputs are token-identical with two cohorts, with one, and without speculation (BART, T5, Whisper;
oracle and n-gram drafts; requests arriving mid-run; preemption in a small pool; adaptive K on);
seeded speculative sampling gives the same tokens with one and two cohorts; drafts proposed and
accepted are the same. CPU, fp32, the eager path (CUDA graphs: tests/gpu/test_micro_batches_gpu.py)."""

from __future__ import annotations

import dataclasses

import pytest

from encdec_cli.engine import Engine, OracleDrafter
from encdec_cli.engine.speculative import PendingVerify
from encdec_models.loading import load_model
from tests.engine.test_speculative import text_requests, whisper_pair, whisper_requests
from tests.support.text_models import single_thread
from tests.support.whisper_models import load_ours


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def run(loaded, reqs, micro_batches, kind=None, stream=True, **cfg):
    """-> (engine, {request id: (tokens, finish reason)}, {request id: (drafts, accepted)},
    verification steps finished as a pending micro-batch step). ``kind``: None (no speculation),
    an ``--speculative`` value or an OracleDrafter."""
    drafter = kind if isinstance(kind, OracleDrafter) else None
    spec = kind if isinstance(kind, str) else None
    engine = Engine(
        loaded,
        drafter=drafter,
        speculative=spec,
        micro_batches=micro_batches,
        **{"block_size": 4, "num_blocks": 400, "max_num_seqs": 12, **cfg},
    )
    pending_verified = 0
    finish_pending = engine._finish_pending

    def spy():
        nonlocal pending_verified
        pending_verified += isinstance(engine._pending[1], PendingVerify)
        return finish_pending()

    engine._finish_pending = spy

    def source():  # a streaming source: now and then nothing is ready yet (requests arrive mid-run)
        for i, r in enumerate(reqs):
            if stream and i % 3 == 1:
                yield None
            yield r

    out, drafts = {}, {}
    for r in engine.generate(source()):
        assert r.error is None, r.error
        out[r.request_id] = (r.token_ids, r.finish_reason)
        drafts[r.request_id] = (r.metrics["draft_tokens"], r.metrics["accepted_tokens"])
    assert sorted(out) == sorted(r.request_id for r in reqs)
    assert engine.blocks.num_free == engine.blocks.num_blocks  # every slot came back, rejected drafts too
    assert engine._pending is None
    return engine, out, drafts, pending_verified


def check_greedy(loaded, reqs, kinds, min_steps=10, **cfg):
    """Each drafter: one cohort and two give plain decoding's tokens; with two, verification steps
    ran as micro-batch steps. -> {kind label: (whole engine, split engine, whole drafts, split drafts)}"""
    _, want, _, _ = run(loaded, reqs, 1, **cfg)
    out = {}
    for label, make in kinds.items():
        whole, got1, d1, _ = run(loaded, reqs, 1, make(want), **cfg)
        split, got2, d2, verified = run(loaded, reqs, 2, make(want), **cfg)
        assert got1 == want, label
        assert got2 == want, label
        assert whole.stats.micro_batch_steps == 0, label
        assert split.stats.micro_batch_steps >= min_steps, label
        assert verified >= min_steps // 2, label  # pending verification steps finished after a launch
        assert split.stats.generated_tokens == whole.stats.generated_tokens, label
        assert split.stats.accepted_tokens > 0, label
        out[label] = (whole, split, d1, d2)
    return out


def oracle(loaded, alpha=0.7, k=4):
    def make(want):
        recorded = {rid: toks for rid, (toks, _) in want.items()}
        return OracleDrafter(recorded, alpha, k, loaded.model.vocab_size, seed=1)

    return make


@pytest.mark.parametrize("name", ["bart", "t5"])
@pytest.mark.parametrize("small_pool", [False, True], ids=["pool", "preemption"])
def test_greedy_same_with_two_cohorts(tiny_text_model, name, small_pool):
    tiny = tiny_text_model(name)
    loaded = load_model(tiny.path, device="cpu", dtype="float32")
    reqs = text_requests(tiny, loaded.tokenizer, n=30, seed=3)
    # look-ahead off: the whole steps' verification would otherwise run ahead with the oracle
    # (Engine._verify_ahead: its K follows the acceptance one step late), the cohorts' does not
    cfg = {"num_blocks": 10, "lookahead": False} if small_pool else {"lookahead": False}
    kinds = {"oracle": oracle(loaded), "ngram": lambda _: "ngram:4"}
    runs = check_greedy(loaded, reqs, kinds, **cfg)
    for label, (whole, split, d1, d2) in runs.items():
        if small_pool:
            assert whole.scheduler.num_preemptions > 0 and split.scheduler.num_preemptions > 0, label
        else:  # no preemption: the same drafts proposed and accepted, request by request
            assert d2 == d1, label
            for field in ("draft_tokens", "accepted_tokens", "generated_tokens"):
                assert getattr(split.stats, field) == getattr(whole.stats, field), (label, field)


def test_greedy_whisper_same_with_two_cohorts(tmp_path):
    target, _ = whisper_pair(tmp_path)
    loaded = load_ours(target)
    reqs = whisper_requests(n=10)
    # a window's cross cache takes 94 blocks: ~7 fit; look-ahead off as in the text test above
    cfg = {"block_size": 16, "num_blocks": 700, "lookahead": False}
    kinds = {"oracle": oracle(loaded, alpha=0.9, k=8), "ngram": lambda _: "ngram:4"}
    runs = check_greedy(loaded, reqs, {"oracle": kinds["oracle"]}, min_steps=6, **cfg)
    whole, split, d1, d2 = runs["oracle"]
    assert d2 == d1
    # prompt lookup on random weights may find little to propose: outputs only
    _, want, _, _ = run(loaded, reqs, 1, **cfg)
    _, got, _, _ = run(loaded, reqs, 2, "ngram:4", **cfg)
    assert got == want


SAMPLED = dict(temperature=0.9, top_k=20)


def test_seeded_speculative_sampling_same_with_two_cohorts(bart_cpu):
    """Each row's random draws do not depend on its step's other rows (``Speculator._sample``), so
    a seeded request samples the same tokens in cohorts as in whole steps. (Not with a pool so
    small that drafts are cut to the room left or requests preempted: a sampled token depends on
    the drafts it was verified against, which then depend on the schedule; its distribution does
    not.)"""
    tiny, loaded = bart_cpu
    reqs = [
        dataclasses.replace(r, params=dataclasses.replace(r.params, seed=100 + r.request_id))
        for r in text_requests(tiny, loaded.tokenizer, n=24, seed=4, **SAMPLED)
    ]
    for kind in ("ngram:3", f"model:{tiny.path}:3"):  # the target as its own (sampling) draft
        whole, want, d1, _ = run(loaded, reqs, 1, kind)
        split, got, d2, verified = run(loaded, reqs, 2, kind)
        assert got == want, kind
        assert split.stats.micro_batch_steps >= 10 and verified >= 5, kind
        assert split.stats.accepted_tokens > 0, kind
        assert d2 == d1, kind


def test_sampled_request_alone_as_in_a_batch(bart_cpu):
    """A seeded speculative request's tokens do not depend on the other requests of its steps."""
    tiny, loaded = bart_cpu
    reqs = [
        dataclasses.replace(r, params=dataclasses.replace(r.params, seed=7 + r.request_id))
        for r in text_requests(tiny, loaded.tokenizer, n=8, seed=5, **SAMPLED)
    ]
    kind = f"model:{tiny.path}:3"
    _, together, _, _ = run(loaded, reqs, 1, kind, stream=False)
    for r in reqs[:3]:
        _, alone, _, _ = run(loaded, [r], 1, kind, stream=False)
        assert alone[r.request_id] == together[r.request_id]


def test_two_cohorts_split_verification_steps(bart_cpu):
    """With two cohorts verification steps split; with adaptive K backed off everywhere (alpha 0:
    drafts rejected) the plain steps between tries run whole and ahead."""
    tiny, loaded = bart_cpu
    reqs = text_requests(tiny, loaded.tokenizer, n=12, seed=3)
    _, want, _, _ = run(loaded, reqs, 1, stream=False)
    for alpha in (0.7, 0.0):
        drafter = oracle(loaded, alpha)(want)
        cfg = dict(block_size=4, num_blocks=400, max_num_seqs=12)
        engine = Engine(loaded, drafter=drafter, micro_batches=2, **cfg)
        got = {r.request_id: (r.token_ids, r.finish_reason) for r in engine.generate(reqs)}
        assert got == want
        assert engine.stats.micro_batch_steps > 4
        if alpha == 0.0:
            assert engine.stats.ahead_steps > 0
