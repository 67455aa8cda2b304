"""How a GPU KV pool is sized (``runner.fit_blocks``), with the device's memory figures stood in:
memory torch's caching allocator holds but no tensor uses (a dropped engine's pool) counts as free,
and when too little is left the error says how much is in use and by whom."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from encdec_cli.engine.config import EngineConfig
from encdec_cli.engine.runner import fit_blocks

GIB = 1 << 30
MODEL = SimpleNamespace(cache_spec=SimpleNamespace(num_heads=4, head_dim=16), vocab_size=100)


def fit(free, total, reserved, allocated, per_block=1 << 20):
    with (
        mock.patch("torch.cuda.mem_get_info", return_value=(free, total)),
        mock.patch("torch.cuda.memory_reserved", return_value=reserved),
        mock.patch("torch.cuda.memory_allocated", return_value=allocated),
    ):
        return fit_blocks(MODEL, EngineConfig(gpu_memory_utilization=0.9), per_block, torch.device("cuda"), 8)


def test_cached_unused_memory_counts_as_free():
    # 9 GiB in use on the device, 8 of them torch's cache of a freed pool: ~8 GiB for this pool
    # (0.9 x 10 GiB - 1 GiB, less the activations' room)
    blocks = fit(free=1 * GIB, total=10 * GIB, reserved=8.5 * GIB, allocated=0.5 * GIB)
    assert 7.9 * 1024 < blocks <= 8 * 1024
    # the same device with those 8 GiB held by live tensors: no room
    with pytest.raises(RuntimeError, match="in use") as err:
        fit(free=1 * GIB, total=10 * GIB, reserved=8.5 * GIB, allocated=8.5 * GIB)
    assert "9.0 of 10.0 GiB in use, 8.5 GiB by this process" in str(err.value)
    assert "Engine.close()" in str(err.value) and "--max-num-seqs" in str(err.value)
