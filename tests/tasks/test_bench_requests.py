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


@pytest.mark.parametrize("wid", ["W7", "W8"])
def test_w7_w8_requests_run_on_a_narrow_model_of_the_architecture(wid):
    """W7 (NLLB-200-distilled-600M: 20-60 input tokens, 16-64 outputs, French forced first) and W8
    (Moonshine base: 10 s waveforms, 16-96 outputs): the request builders give those shapes, and the
    requests run through the engine on the CPU on the same architecture narrowed (widths and depth
    cut, vocabulary, positions and front end kept), each making exactly its target length."""
    import numpy as np
    import torch
    from transformers import GenerationConfig

    from encdec_cli.engine import Engine
    from encdec_cli.tasks.bench import NLLB_FRA_LATN
    from encdec_models.loading import LoadedModel, build_model
    from encdec_models.registry import architecture_of

    w = WORKLOADS[wid]
    small = Workload(**{**asdict(w), "requests": 3})
    enc_inputs, targets = inputs_for(small)
    config = hf_config(w.model)
    if wid == "W7":
        assert w.requests == 1024 and w.forced_bos == NLLB_FRA_LATN < config.vocab_size
        assert all(20 <= len(x) <= 60 and 0 <= min(x) and max(x) < config.vocab_size for x in enc_inputs)
        assert all(16 <= t <= 64 for t in targets)
        narrow = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64)  # fmt: skip
    else:
        assert w.requests == 512 and w.metric == "RTFx"
        assert all(x.shape == (160000,) and x.dtype == np.float32 for x in enc_inputs)
        assert all(16 <= t <= 96 for t in targets)
        narrow = dict(hidden_size=64, intermediate_size=64, encoder_num_hidden_layers=1,
                      decoder_num_hidden_layers=1, encoder_num_attention_heads=2,
                      decoder_num_attention_heads=2, encoder_num_key_value_heads=2,
                      decoder_num_key_value_heads=2)  # fmt: skip
    for k, v in narrow.items():
        setattr(config, k, v)
    reqs = workload_requests(small, config, enc_inputs, targets)
    if wid == "W7":
        assert all(r.params.forced_tokens == ((0, NLLB_FRA_LATN),) for r in reqs)
    from transformers import AutoModelForSeq2SeqLM, MoonshineForConditionalGeneration

    torch.manual_seed(0)
    hf = (
        MoonshineForConditionalGeneration(config)
        if wid == "W8"
        else AutoModelForSeq2SeqLM.from_config(config)
    )
    arch = architecture_of(config)
    ours = build_model(arch, config, hf.state_dict().items(), torch.device("cpu"), torch.float32)
    loaded = LoadedModel(ours, None, config, GenerationConfig.from_model_config(config), arch, None)
    out = {r.request_id: r for r in Engine(loaded, num_blocks=200, block_size=16).generate(reqs)}
    assert [len(out[i].token_ids) for i in range(3)] == targets
    if wid == "W7":
        assert all(out[i].token_ids[0] == NLLB_FRA_LATN for i in range(3))
