"""The standard workloads' requests (encdec bench), built on the CPU: what the timed run and its
warm-up hand the engine (the timing itself needs a GPU: benchmarks/, never unit tests)."""

from dataclasses import asdict

import pytest

from encdec_cli.tasks.bench import (
    WARMUP_REQUESTS,
    WORKLOADS,
    Workload,
    hf_config,
    inputs_for,
    text_config,
    warmup_requests,
    workload_requests,
)


@pytest.mark.parametrize("wid", sorted(WORKLOADS))
def test_workload_and_warmup_requests(wid):
    w = WORKLOADS[wid]
    small = Workload(**{**asdict(w), "requests": min(w.requests, 70)})  # W5 keeps its single request
    enc_inputs, targets = inputs_for(small)
    assert len(enc_inputs) == len(targets) == small.requests
    config = hf_config(w.model)
    reqs = workload_requests(small, config, enc_inputs, targets)
    config = text_config(config)  # Florence-2 (W9): its language model's token ids
    assert [r.params.max_new_tokens for r in reqs] == targets == [r.params.min_new_tokens for r in reqs]
    assert all(r.prompt_ids == [config.decoder_start_token_id] for r in reqs)
    assert all(r.params.num_beams == w.num_beams for r in reqs)
    warm = warmup_requests(small, config, enc_inputs, targets)
    assert len(warm) == min(WARMUP_REQUESTS, small.requests)  # W5: one (a mismatch once broke its bench)
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
    # an fp8 pool: one byte a value plus a float32 scale a cached row
    ab8 = floors(w, model, enc_inputs, targets, 4, True, rates, "fp8_e4m3")
    assert ab8["floor_layout"] == "absorbed fp8"
    enc_row8 = spec.num_layers * (model.d_model + 4)
    kv_row8 = 2 * spec.num_layers * spec.num_heads * (spec.head_dim + 4)
    self_reads = sum(t * t / 2 for t in targets)
    diff8 = (ab["decode_floor_s"] - ab8["decode_floor_s"]) * rates["copy_bytes_per_s"]
    assert diff8 == pytest.approx(cross_reads * (enc_row - enc_row8) + self_reads * (kv_row - kv_row8))


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


def _tiny_w1(tmp_path):
    """A small random Whisper and a W1-shaped workload of three short clips: (model, workload,
    inputs, target lengths)."""
    import torch

    from tests.support.whisper_models import load_ours, random_whisper

    random_whisper(tmp_path)
    g = torch.Generator().manual_seed(0)
    enc_inputs = [(torch.randn(16000, generator=g) * 0.1).numpy() for _ in range(3)]
    return load_ours(tmp_path), Workload("W1", "whisper-large-v3", 3, metric="RTFx"), enc_inputs, [6, 9, 12]


def test_oracle_sweep_records_then_verifies_the_recorded_tokens(tmp_path, monkeypatch):
    """``encdec bench --speculative oracle`` on a small random Whisper (CPU; the sweep's timing is
    meaningless here, its bookkeeping is not): the plain run's tokens are the drafts; alpha 1
    accepts every draft and alpha 0 none, and every run's outputs equal the plain run's."""
    import torch

    from encdec_cli.tasks.bench import run_oracle_sweep

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    loaded, w, enc_inputs, targets = _tiny_w1(tmp_path)
    cfg = {"max_num_seqs": 4, "num_blocks": 400, "block_size": 16, "profile": True}
    sweep, (wall, tokens, info) = run_oracle_sweep(
        w, loaded, enc_inputs, targets, cfg, (0.0, 1.0), (2, 3), lambda wall, tok: tok / wall
    )
    assert tokens == sum(targets) and sweep["synthetic"] and sweep["plain"]["value"] > 0
    runs = {(r["alpha"], r["k"]): r for r in sweep["runs"]}
    assert sorted(runs) == [(0.0, 2), (0.0, 3), (1.0, 2), (1.0, 3)]
    for (alpha, _), r in runs.items():
        assert r["outputs_equal_to_plain"] == 1.0 and r["off_track_proposals"] == 0
        assert r["outputs_equal_to_oracle_path"] == 1.0 and r["oracle_path_moved"] == 0  # fp32: exact
        assert r["draft_tokens"] > 0
        assert r["acceptance_rate"] == alpha
    assert runs[(1.0, 3)]["tokens_per_step"] > runs[(1.0, 2)]["tokens_per_step"] > 2.0
    for r in runs.values():  # 3 requests: 3 seeds make ORACLE_PATHS (8) requests' drafts or more
        assert sweep["oracle_seeds"] == r["seeds"] == len(r["per_seed"]) == 3 == sweep["plain"]["runs"]
    assert runs[(0.0, 3)]["tokens_per_step"] == 1.0
    assert {"encode", "draft", "decode", "sample"} <= runs[(1.0, 3)]["profile_s"].keys()
    assert "draft" not in info["profile_s"]  # the plain run drafts nothing
    assert info["graphs"] is False and info["graph_replays"] == info["whole_graph_replays"] == 0  # CPU


def test_oracle_sweep_averages_one_requests_drafts_over_seeds(tmp_path, monkeypatch):
    """One request (W5's shape) is one draw of which drafts are wrong: a sweep point runs it with
    ORACLE_PATHS oracle seeds, each drawing its own wrong tokens, and reports their tokens over
    their time and their counters summed."""
    import torch

    from encdec_cli.tasks.bench import ORACLE_PATHS, oracle_seeds, run_oracle_sweep

    assert (oracle_seeds(1), oracle_seeds(3), oracle_seeds(512)) == (ORACLE_PATHS, 3, 1)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    loaded, w, enc_inputs, _ = _tiny_w1(tmp_path)
    cfg = {"max_num_seqs": 1, "num_blocks": 400, "block_size": 16}
    sweep, _ = run_oracle_sweep(
        w, loaded, enc_inputs[:1], [40], cfg, (0.5,), (4,), lambda wall, tok: tok / wall
    )
    (r,) = sweep["runs"]
    assert r["seeds"] == len(r["per_seed"]) == ORACLE_PATHS
    assert [x["seed"] for x in r["per_seed"]] == list(range(ORACLE_PATHS))
    each = [x["tokens_per_step"] for x in r["per_seed"]]
    assert len(set(each)) > 1  # other draws of the wrong drafts
    assert min(each) < r["tokens_per_step"] < max(each)
    assert r["outputs_equal_to_plain"] == 1.0 and 0 < r["acceptance_rate"] < 1
    assert r["value"] == pytest.approx(40 / r["wall_s"])
    # the reference: as many plain runs as seeds, every one the recorded tokens, their mean time
    plain = sweep["plain"]
    assert plain["runs"] == len(plain["per_run_wall_s"]) == ORACLE_PATHS and plain["runs_equal"]
    assert plain["wall_s"] == pytest.approx(sum(plain["per_run_wall_s"]) / ORACLE_PATHS)
    assert plain["value"] == pytest.approx(40 / plain["wall_s"])
    assert r["speedup"] == pytest.approx(r["value"] / plain["value"])


def test_oracle_path_settles_on_the_speculative_engines_own_greedy_tokens(tmp_path, monkeypatch):
    """Where a recorded path is not the speculative engine's greedy output (on a GPU: bf16 near-ties
    rounding differently in the verification kernels), ``_settled_path`` replaces it with the
    engine's own tokens, so the sweep's drafts are wrong only where alpha makes them wrong."""

    from encdec_cli.engine import Engine, OracleDrafter
    from encdec_cli.tasks.bench import _settled_path, workload_requests

    loaded, w, enc_inputs, targets = _tiny_w1(tmp_path)
    cfg = {"max_num_seqs": 4, "num_blocks": 400, "block_size": 16}
    plain = Engine(loaded, **cfg)
    greedy = {
        r.request_id: r.token_ids
        for r in plain.generate(workload_requests(w, loaded.config, enc_inputs, targets))
    }
    vocab = loaded.model.vocab_size
    wrong = dict(greedy)
    rid = next(iter(wrong))
    wrong[rid] = wrong[rid][:3] + [(t + 1) % vocab for t in wrong[rid][3:]]  # off the path from token 3
    engine = Engine(loaded, drafter=OracleDrafter(wrong, 1.0, 3, vocab), **cfg)
    path, moved = _settled_path(w, engine, loaded, enc_inputs, targets, wrong, 3, vocab)
    assert path == greedy and moved == 1
    # the sweep settles at each alpha: wrong drafts change which steps verify, not float32's tokens
    assert _settled_path(w, engine, loaded, enc_inputs, targets, wrong, 3, vocab, alpha=0.5) == (greedy, 1)
    assert _settled_path(w, engine, loaded, enc_inputs, targets, greedy, 3, vocab) == (greedy, 0)


def test_tensorrt_llm_shapes_run_exactly_128_tokens_at_their_batch():
    """T1 / T2 are TensorRT-LLM's published shapes: a group id runs batch 32, 64 and 128 in order,
    each request makes exactly 128 tokens, and the engine and the baseline run at that batch."""
    from encdec_cli.tasks.bench import TRTLLM_H100, expand_ids

    ids, bad = expand_ids(["t2", "W1", "T1-B64", "T9"])
    assert ids == ["T2-B32", "T2-B64", "T2-B128", "W1", "T1-B64"] and bad == ["T9"]
    w = WORKLOADS["T2-B64"]
    assert (w.model, w.batch, w.requests, w.output_tokens) == ("flan-t5-xl", 64, 256, 128)
    assert dict(w.published) == {"legacy": 3863, "pytorch": 4184}
    assert dict(WORKLOADS["T1-B128"].published)["legacy"] == TRTLLM_H100["bart-large-cnn"]["legacy"][2]
    cfg = hf_config("flan-t5-xl")
    shape = (cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.num_layers, cfg.vocab_size)
    assert shape == (2048, 5120, 32, 24, 32128)
    enc_inputs, targets = inputs_for(w)
    assert targets == [128] * 256 and all(260 <= len(x) <= 440 for x in enc_inputs)


def test_w9_florence2_large_captions():
    """W9: Florence-2-large's architecture; 768 x 768 images whose 577 image tokens (the count our
    model computes from its DaViT strides) precede the 8-token <CAPTION> prompt; 16..64 new tokens
    each, from </s>."""
    import torch

    from encdec_models.florence2 import Florence2

    w = WORKLOADS["W9"]
    assert (w.model, w.requests, w.num_beams) == ("florence-2-large", 512, 1)
    small = Workload(**{**asdict(w), "requests": 3})
    enc_inputs, targets = inputs_for(small)
    cfg = hf_config(w.model)
    with torch.device("meta"):
        model = Florence2(cfg)
    for x in enc_inputs:
        assert tuple(x["pixel_values"].shape) == (3, 768, 768) and x["pixel_values"].device.type == "cpu"
        assert x["input_ids"].count(cfg.image_token_id) == 577 == model.image_tokens(768, 768)
        assert model.encoder_length(x) == 577 + 8
    assert (
        all(16 <= t <= 64 for t in targets)
        and len(set(inputs_for(Workload(**{**asdict(w), "requests": 40}))[1])) > 5
    )
    reqs = workload_requests(small, cfg, enc_inputs, targets)
    assert all(r.prompt_ids == [2] and r.params.stop_token_ids == (2,) for r in reqs)
    v, t = cfg.vision_config, cfg.text_config
    assert (list(v.embed_dim), list(v.depths), v.window_size) == ([256, 512, 1024, 2048], [1, 1, 9, 1], 12)
    assert (t.d_model, t.encoder_layers, t.decoder_layers, t.encoder_attention_heads) == (1024, 12, 12, 16)


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


def test_the_cli_defaults_are_the_tasks():
    """``encdec bench``'s defaults are written out in the command (its --help imports no torch):
    they must stay the task module's."""
    from encdec_cli.commands import bench as command
    from encdec_cli.tasks import bench as task

    assert command.ENGINE_SEQS == task.ENGINE_SEQS
    assert tuple(map(float, command.ORACLE_ALPHAS.split(","))) == task.ORACLE_ALPHAS
