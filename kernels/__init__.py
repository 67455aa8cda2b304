"""Attention and norm kernels: pure functions on tensors, never importing the engine.

The functions exported here dispatch on the device: CUDA tensors go to the Triton kernels
(``kernels/attention.py``, ``kernels/norm.py``), everything else to the plain-PyTorch
references in ``kernels/reference.py``. ``ENCDEC_KERNELS=reference`` forces the references
everywhere (used by tests that compare the two paths end to end).

Note: this package deliberately has no ``__version__`` and is installed under the
distribution name ``encdec``, so transformers never mistakes it for the Hub ``kernels``
package (see DESIGN.md, "Known hazard").
"""

from __future__ import annotations

import importlib
import os

from kernels import reference
from kernels.reference import RelBias

__all__ = [
    "RelBias",
    "varlen_attention",
    "paged_attention",
    "shared_kv_attention",
    "store_kv",
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "use_triton",
]


def use_triton(t) -> bool:
    """Whether the Triton kernels serve tensor ``t`` (CUDA and not forced to the reference)."""
    if not t.is_cuda or os.environ.get("ENCDEC_KERNELS", "triton") == "reference":
        return False
    try:
        import kernels.attention  # noqa: F401  (imports triton)
    except ImportError:
        return False
    return True


def _impl(t, triton_module: str):
    """The module implementing a kernel for tensor ``t``: Triton's on CUDA, else the reference."""
    if use_triton(t):
        return importlib.import_module(f"kernels.{triton_module}")
    return reference


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, scale, causal=False, rel_bias=None):
    return _impl(q, "attention").varlen_attention(
        q, k, v, cu_seqlens, max_seqlen, scale=scale, causal=causal, rel_bias=rel_bias
    )


def paged_attention(
    q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, *, scale, causal, rel_bias=None
):
    return _impl(q, "attention").paged_attention(
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q,
        scale=scale, causal=causal, rel_bias=rel_bias,
    )  # fmt: skip


def shared_kv_attention(q, rows, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, *, scale):
    return _impl(q, "attention").shared_kv_attention(
        q, rows, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, scale=scale
    )


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    return _impl(k, "attention").store_kv(k, v, k_cache, v_cache, slot_mapping)


def layer_norm(x, weight, bias, eps):
    return _impl(x, "norm").layer_norm(x, weight, bias, eps)


def rms_norm(x, weight, eps):
    return _impl(x, "norm").rms_norm(x, weight, eps)


def add_layer_norm(x, residual, weight, bias, eps):
    return _impl(x, "norm").add_layer_norm(x, residual, weight, bias, eps)


def add_rms_norm(x, residual, weight, eps):
    return _impl(x, "norm").add_rms_norm(x, residual, weight, eps)
