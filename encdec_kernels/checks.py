"""Input checks shared by the Triton launchers: a bad argument raises a ValueError that names
it, instead of a crash inside a kernel or a silently wrong result."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name, t, ndim, dtypes=SUPPORTED_DTYPES, device=None, contiguous=False, first="q"):
    """t is a tensor of ``ndim`` dims and one of ``dtypes``, contiguous in its last dim (fully, with
    ``contiguous``), on ``device`` (that of the call's first input, named ``first``) if given."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but {first} is on {device}; move all inputs to one device")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call .contiguous() on it")
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides {t.stride()}")
