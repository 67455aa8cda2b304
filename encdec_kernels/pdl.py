"""Programmatic dependent launch (PDL, Hopper and newer): a kernel may start while the kernel
before it in the stream still runs.

Kernels of a decode step are short (a few microseconds at batch 1), so the launch and ramp-up of
each one is a visible share of the step. A kernel that takes part (a ``PDL`` constexpr) calls
``gdc_launch_dependents()`` first, so the next kernel may be scheduled early, and
``gdc_wait()`` before it reads anything an earlier kernel wrote and before any store (its output
may reuse memory the previous kernel still reads). Work that depends on no earlier kernel, such
as reading weights, may go before the wait. Both instructions are no-ops without PDL, and a
CUDA-graph capture keeps the early launch.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["pdl_launch"]

PDL_ENV = "ENCDEC_PDL"  # "0": launch every kernel normally (to compare)


@functools.lru_cache(maxsize=8)
def _supported(device: torch.device) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9


def pdl_launch(t: torch.Tensor) -> dict:
    """Launch keyword arguments for a PDL-aware kernel working on tensor ``t``: ``PDL`` (the
    kernel's constexpr) and triton's ``launch_pdl``; PDL off on CPU tensors (the interpreter
    runs no PTX), before Hopper, and with ENCDEC_PDL=0."""
    on = t.is_cuda and os.environ.get(PDL_ENV, "1") != "0" and _supported(t.device)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}
