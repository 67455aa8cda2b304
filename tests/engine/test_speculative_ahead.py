"""Verification steps launched ahead (``Engine._verify_ahead``): with a drafter that drafts ahead
(the oracle), each verification step's successor is launched from its outcome on the device
before that outcome reaches the host. Greedy tokens stay those of plain decoding: at batch 1 over
many blocks, with rows that end (a stop token, their length, the positions' limit) while a step
is in flight, and with a pool too small to reserve the next step's slots. CPU, float32 (the
eager path; the CUDA-graph path: tests/gpu/test_speculative_gpu.py)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from encdec_cli.engine import Engine, OracleDrafter, Request, SamplingParams
from encdec_cli.engine.engine import Engine as _Engine
from encdec_cli.engine.speculative import Speculator
from tests.support.text_models import random_text_requests, single_thread
from tests.support.whisper_models import EOT, SOT, load_ours, random_whisper


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _run(loaded, reqs, drafter=None, **cfg):
    engine = Engine(loaded, drafter=drafter, **{"block_size": 4, "num_blocks": 400, "max_num_seqs": 8, **cfg})
    results = list(engine.generate(reqs))
    assert not [r.error for r in results if r.error]
    assert engine.num_free_blocks == engine.num_blocks  # every slot came back, reserved ones too
    return engine, {r.request_id: (r.token_ids, r.finish_reason) for r in results}


def _oracle(want, vocab, alpha, k):
    return OracleDrafter({rid: toks for rid, (toks, _) in want.items()}, alpha, k, vocab, seed=3)


@pytest.mark.parametrize("alpha", [0.5, 0.9, 1.0])
def test_batch_one_whisper_long_output(tmp_path, alpha):
    """W5's shape: one sequence slot, 60 tokens over 15 blocks of 4; every verification step after
    the first of a chain is launched ahead; the same tokens with look-ahead off."""
    random_whisper(tmp_path, max_target_positions=128)
    loaded = load_ours(tmp_path)
    x = (torch.randn(16000 * 2, generator=torch.Generator().manual_seed(0)) * 0.1).numpy()
    p = SamplingParams(max_new_tokens=60, min_new_tokens=60, stop_token_ids=(EOT,))
    reqs = [Request(x, [SOT], p, 0)]
    _, want = _run(loaded, reqs, max_num_seqs=1)
    assert len(want[0][0]) == 60
    for k in (2, 4):
        engine, got = _run(loaded, reqs, _oracle(want, loaded.model.vocab_size, alpha, k), max_num_seqs=1)
        assert got == want, k
        st = engine.stats
        assert st.accepted_tokens > 0 and st.verify_steps > 1, k
        # the first verification step is launched from the host, the rest ahead (adaptive K can
        # back a sequence off to no drafts at alpha 0.5: such steps break the chain)
        assert st.ahead_steps >= (st.verify_steps - 1 if alpha == 1.0 else 1), (k, st)
        off, got_off = _run(
            loaded, reqs, _oracle(want, loaded.model.vocab_size, alpha, k), max_num_seqs=1, lookahead=False
        )
        assert got_off == want and off.stats.ahead_steps == 0, k


def test_rows_ending_while_a_step_is_in_flight(bart_cpu, monkeypatch):
    """Many rows at once, none waiting (every step may run ahead): rows that a step ends by a stop
    token or their length are dropped from the step launched ahead of it; the rest go on."""
    tiny, loaded = bart_cpu
    reqs = random_text_requests(tiny, loaded.tokenizer, 12, 5, (2, 12), (3, 24), (0, 0, 4))
    _, want = _run(loaded, reqs, max_num_seqs=12)
    assert {reason for _, reason in want.values()} == {"stop", "length"}
    dropped = []
    original = _Engine._take_verify_ahead

    def spy(self):
        before = len(self._ahead.seqs)
        ahead = original(self)
        dropped.append(before - (len(ahead.seqs) if ahead is not None else 0))
        return ahead

    monkeypatch.setattr(_Engine, "_take_verify_ahead", spy)
    for alpha, k in ((0.7, 4), (1.0, 3)):
        engine, got = _run(loaded, reqs, _oracle(want, loaded.model.vocab_size, alpha, k), max_num_seqs=12)
        assert got == want, (alpha, k)
        assert engine.stats.ahead_steps > 0 and engine.stats.accepted_tokens > 0
    assert any(dropped), "no step launched ahead lost a row"


def test_positions_limit_and_small_pool(tmp_path):
    """Sequences that run into the model's positions (max_target_positions 24) and a pool that
    cannot always reserve the next step's slots: the chain stops or the step launched ahead
    writes nowhere past the limit; the tokens stay plain decoding's."""
    random_whisper(tmp_path, max_target_positions=24)
    loaded = load_ours(tmp_path)
    g = torch.Generator().manual_seed(4)
    reqs = [
        Request(
            (torch.randn(16000, generator=g) * 0.1).numpy(),
            [SOT],
            SamplingParams(max_new_tokens=40, stop_token_ids=(EOT,)),
            i,
        )
        for i in range(3)
    ]
    cfg = {"block_size": 4, "max_num_seqs": 3}
    _, want = _run(loaded, reqs, **cfg, num_blocks=800)
    assert all(len(t) == 23 for t, _ in want.values())  # the positions' limit, not max_new_tokens
    # a window's cross cache takes 375 blocks of 4: room for the three plus a few output blocks
    refused = {}  # chains refused before the drafter was asked: no drafts wanted, or no room
    for blocks in (800, 3 * 375 + 14):
        oracle = _oracle(want, loaded.model.vocab_size, 1.0, 4)
        asked, count = oracle.propose_ahead, [0, 0]

        def counted(*a, asked=asked, count=count):
            count[0] += 1
            return asked(*a)

        oracle.propose_ahead = counted
        real = Speculator.propose_ahead

        def spy(self, *a, real=real, count=count):
            before = count[0]
            out = real(self, *a)
            count[1] += out[0] is None and count[0] == before
            return out

        with mock.patch.object(Speculator, "propose_ahead", spy):
            engine, got = _run(loaded, reqs, oracle, **cfg, num_blocks=blocks)
        assert got == want, blocks
        assert engine.stats.ahead_steps > 0, blocks
        refused[blocks] = count[1]
    # the small pool refuses chains the large one launches (it cannot reserve their slots)
    assert refused[3 * 375 + 14] > refused[800], refused
