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


def test_floors_count_the_layout_used_and_divide_by_the_measured_rates(tmp_path):
    """The decode floor counts the cross-attention bytes of the layout the engine ran (absorbed:
    the encoder rows read by every layer; else every layer's K and V) and divides by the device's
    measured copy bandwidth; the encoder floor by its measured matmul rate."""
    from encdec_cli.tasks.bench import floors
    from tests.support.whisper_models import load_ours, random_whisper

    random_whisper(tmp_path)
    model = load_ours(tmp_path).model
    spec = model.cache_spec
    w = Workload("W1", "whisper-large-v3", 4, metric="RTFx")
    enc_inputs, targets = [None] * 4, [10, 20, 30, 40]
    rates = {"copy_bytes_per_s": 1e12, "bf16_flop_per_s": 1e14}
    kv = floors(w, model, enc_inputs, targets, 4, absorbed=False, rates=rates)
    ab = floors(w, model, enc_inputs, targets, 4, absorbed=True, rates=rates)
    assert (kv["floor_layout"], ab["floor_layout"]) == ("kv", "absorbed")
    kv_row = 2 * spec.num_layers * spec.num_heads * spec.head_dim * 2  # K + V of all layers, bf16
    enc_row = spec.num_layers * model.d_model * 2  # one encoder row read by every layer, bf16
    cross_reads = sum(t * 1500 for t in targets)  # rows read: each step reads its sequence's 1500 rows
    diff = (kv["decode_floor_s"] - ab["decode_floor_s"]) * rates["copy_bytes_per_s"]
    assert diff == pytest.approx(cross_reads * (kv_row - enc_row))
    assert ab["encoder_floor_s"] == kv["encoder_floor_s"] > 0
    faster = floors(w, model, enc_inputs, targets, 4, True, {k: 2 * v for k, v in rates.items()})
    assert faster["floor_s"] == pytest.approx(ab["floor_s"] / 2)


def test_w6_duplicates_fallbacks_and_prefix_cache_hits(tmp_path):
    """W6's windows: a quarter exact copies (new arrays), 30% of the distinct windows falling back
    (their copies with them); its run on a tiny Whisper (CPU) encodes each distinct window once
    with the cache on (every copy and every fallback candidate a hit) and decodes the same tokens
    as with it off."""
    import numpy as np

    from encdec_cli.engine import Engine
    from encdec_cli.tasks.bench import W6_BEST_OF, prefix_inputs, run_prefix
    from tests.support.text_models import single_thread
    from tests.support.whisper_models import load_ours, random_whisper

    w = Workload(**{**asdict(WORKLOADS["W6"]), "requests": 16})
    waves, targets, falls = prefix_inputs(w)
    keys = [x.tobytes() for x in waves]
    assert len(waves) == 16 and len(set(keys)) == 12  # 4 copies
    assert len({id(x) for x in waves}) == 16  # each its own array, as a copied file gives
    assert sum(f for k, f in {k: f for k, f in zip(keys, falls)}.items()) == 4  # 30% of 12 distinct
    for a, b in [(i, j) for i in range(16) for j in range(i) if keys[i] == keys[j]]:
        assert falls[a] == falls[b] and targets[a] == targets[b]
    assert np.array_equal(waves[0], prefix_inputs(w)[0][0])  # seeded
    random_whisper(tmp_path)
    loaded = load_ours(tmp_path)
    short = [t % 5 + 2 for t in targets]  # shorter outputs: a CPU test
    tokens = {}
    for on in (False, True):
        engine = Engine(loaded, prefix_cache=on, block_size=16, num_blocks=4000, max_num_seqs=16)
        with single_thread():
            wall, tokens[on] = run_prefix(engine, loaded.config, waves, short, falls)
        stats = engine.stats
    want = sum(short) + W6_BEST_OF * sum(t for t, f in zip(short, falls) if f)
    assert tokens[True] == tokens[False] == want
    assert stats.prefix_cache_misses == 12 and stats.prefix_cache_hits == 4 + W6_BEST_OF * sum(falls)
