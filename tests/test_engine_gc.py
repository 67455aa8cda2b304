"""Engine.generate freezes the heap that existed before it out of the cyclic garbage collector while
it runs (full collections would walk all of torch/transformers/the model), and unfreezes it after."""

from __future__ import annotations

import gc
import weakref

from encdec_cli.engine import Engine, Request, SamplingParams
from models.loading import load_model
from tests.text_models import build_tiny_model, single_thread


class _Cycle:
    def __init__(self):
        self.me = self


def test_generate_freezes_the_old_heap_only_while_it_runs(tmp_path):
    tiny = build_tiny_model("bart", tmp_path, max_steps=0)
    loaded = load_model(tiny.path, device="cpu", dtype="float32")
    engine = Engine(loaded, block_size=4, num_blocks=64, max_num_seqs=4)
    params = SamplingParams(max_new_tokens=4, stop_token_ids=(tiny.eos_token_id,), num_beams=2)
    made_during: list[weakref.ref] = []

    def requests():
        for i in range(3):
            made_during.append(weakref.ref(_Cycle()))  # cyclic garbage made while generating
            yield Request([5, 6, 7, 8], tiny.prompt_ids, params, i)

    assert gc.get_freeze_count() == 0
    with single_thread():
        frozen = []
        for _ in engine.generate(requests()):
            frozen.append(gc.get_freeze_count())
            gc.collect()
            assert all(r() is None for r in made_during)  # new objects are still collected
        assert len(frozen) == 3 and min(frozen) > 0
        assert gc.get_freeze_count() == 0  # unfrozen at the end

        it = engine.generate(requests())
        next(it)
        assert gc.get_freeze_count() > 0
        it.close()  # a caller that stops early
        assert gc.get_freeze_count() == 0
