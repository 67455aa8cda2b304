"""Host index data to the device without a stream sync (the engine's hot path must never wait for
the GPU by accident: a copy from pageable memory waits for every queued GPU step)."""

from __future__ import annotations

import numpy as np
import torch

from encdec_models.base import host_to_device

_NUMPY = {torch.long: np.int64, torch.int32: np.int32, torch.float32: np.float32, torch.float64: np.float64}


def to_device(dev: torch.device, data, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host data (a list, nested lists or a numpy array) as a tensor on ``dev``, without a sync: on
    CUDA it goes through pinned memory with a non-blocking copy (a copy from pageable memory, as
    ``cuda_tensor[python_list]`` or ``torch.tensor(data, device=...)`` make, waits for every
    queued GPU step). Lists go through numpy (a copy): several times faster than
    ``torch.tensor`` for nested lists, the same values."""
    as_numpy = _NUMPY.get(dtype)
    if as_numpy is None:
        return host_to_device(torch.tensor(data, dtype=dtype), dev)
    return host_to_device(torch.from_numpy(np.array(data, as_numpy)), dev)


def take_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] without ``x[rows]``: that copies the index from pageable memory, a stream sync
    that would wait for every queued GPU step (the GPU then idles until the next launch)."""
    return x.index_select(0, to_device(x.device, rows))
