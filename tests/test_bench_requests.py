"""The standard workloads' requests (encdec bench), built on the CPU: what the timed run and its
warm-up hand the engine (the timing itself needs a GPU: benchmarks/, never unit tests)."""

from dataclasses import asdict

import pytest

from encdec_cli.tasks.bench import (
    WORKLOADS,
    Workload,
    hf_config,
    inputs_for,
    warmup_requests,
    workload_requests,
)


@pytest.mark.parametrize("wid", sorted(WORKLOADS))
def test_workload_and_warmup_requests(wid):
    w = WORKLOADS[wid]
    small = Workload(**{**asdict(w), "requests": min(w.requests, 6)})  # W5 keeps its single request
    enc_inputs, targets = inputs_for(small)
    assert len(enc_inputs) == len(targets) == small.requests
    config = hf_config(w.model)
    reqs = workload_requests(small, config, enc_inputs, targets)
    assert [r.params.max_new_tokens for r in reqs] == targets == [r.params.min_new_tokens for r in reqs]
    assert all(r.prompt_ids == [config.decoder_start_token_id] for r in reqs)
    assert all(r.params.num_beams == w.num_beams for r in reqs)
    warm = warmup_requests(small, config, enc_inputs, targets)
    assert len(warm) == min(4, small.requests)  # W5: one (a mismatch here once broke its bench)
    assert all(r.params.max_new_tokens == targets[0] for r in warm)
