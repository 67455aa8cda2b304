"""The bench's engine sequence (``run_oracle_sweep``: a plain engine, then one per K on the same
model) gives each engine's KV pool back before the next engine sizes its own: on the H200 a pool
kept alive by the model's layers (``bind_cache``) left W1's sweep without memory for the next one."""

from __future__ import annotations

import gc
import weakref

import encdec_cli.engine as engine_api
from encdec_cli.engine import Engine
from encdec_cli.tasks.bench import Workload, run_oracle_sweep
from encdec_models.loading import load_model
from tests.support.text_models import single_thread


def test_closed_engine_frees_its_pool_and_a_new_engine_unbinds_the_old_one(tiny_text_model):
    loaded = load_model(tiny_text_model("bart").path, device="cpu", dtype="float32")
    cfg = {"block_size": 4, "num_blocks": 64, "max_num_seqs": 4}
    a = Engine(loaded, **cfg)
    pool = weakref.ref(a.runner.pool)
    a.close()
    gc.collect()
    assert pool() is None  # the engine still exists; its pool is gone (the model let go of it too)
    b = Engine(loaded, **cfg)
    pool_b = weakref.ref(b.runner.pool)
    del b  # dropped without close: the next engine on the model unbinds it before sizing its own
    gc.collect()
    c = Engine(loaded, **cfg)
    assert pool_b() is None
    assert c.runner.pool is not None


def test_oracle_sweep_releases_each_engine_before_the_next(tiny_text_model, monkeypatch):
    tiny = tiny_text_model("bart")
    loaded = load_model(tiny.path, device="cpu", dtype="float32")
    live: list[tuple[weakref.ref, weakref.ref]] = []  # (engine, its pool) of each engine made

    class Tracked(Engine):
        def __init__(self, *args, **kwargs):
            gc.collect()
            # what the H200 sweep needs: every earlier engine and its pool gone before this one sizes
            assert [(e(), p()) for e, p in live] == [(None, None)] * len(live)
            super().__init__(*args, **kwargs)
            live.append((weakref.ref(self), weakref.ref(self.runner.pool)))

    monkeypatch.setattr(engine_api, "Engine", Tracked)
    w = Workload("t", "bart-large-cnn", requests=3)
    enc = [loaded.tokenizer(f"w{i} w{i + 1} w{i + 2}").input_ids for i in range(3)]
    with single_thread():
        sweep, (wall, tokens, info) = run_oracle_sweep(
            w,
            loaded,
            enc,
            [5, 6, 4],
            {"block_size": 4, "num_blocks": 200},
            (0.0, 1.0),
            (2, 3),
            lambda t, n: n / t,
        )
    gc.collect()
    assert len(live) == 3 and [(e(), p()) for e, p in live] == [(None, None)] * 3
    runs = sweep["runs"]
    assert [(r["k"], r["alpha"]) for r in runs] == [(2, 0.0), (2, 1.0), (3, 0.0), (3, 1.0)]
    assert all(r["outputs_equal_to_plain"] == 1.0 for r in runs) and tokens == 15
    assert all(r["acceptance_rate"] == 1.0 for r in runs if r["alpha"] == 1.0)
    assert sweep["adaptive_k"] and all(r["preemptions"] == 0 and r["max_num_seqs_after"] == 3 for r in runs)
