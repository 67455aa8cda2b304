"""Attention, norm and few-row linear kernels: pure functions on tensors, never importing the engine.

The functions exported here dispatch on the device: CUDA tensors go to the Triton kernels
(``varlen.py``, ``paged.py``, ``shared_kv.py``, ``norm.py``, ``linear.py``; on Hopper, long
encoder attention goes on to the Gluon kernel of ``flash_hopper.py`` and absorbed
cross-attention to ``shared_kv_hopper.py``), everything else to the plain-PyTorch references in
``reference.py``. ``ENCDEC_KERNELS=reference`` forces the references everywhere (used by tests
that compare the two paths end to end).

The package is named ``encdec_kernels``, not ``kernels``: transformers depends on Hugging Face's
kernel-hub package, a top-level ``kernels`` (docs/design.md, "Import names").
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

# Triton 3.9 warns that it stops fusing a * b + c into one FMA by default in 3.10; the kernels are
# built and measured with the fusion (one rounding, fewer instructions): keep it unless the user chose
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from encdec_kernels import reference  # noqa: E402
from encdec_kernels.checks import SHARED_KV_TILE_ROWS, SPLIT_PARTIALS_MAX_BYTES
from encdec_kernels.reference import FP8_DTYPE, RelBias

__all__ = [
    "RelBias",
    "varlen_attention",
    "paged_attention",
    "merge_attention",
    "shared_kv_attention",
    "store_kv",
    "store_rows",
    "copy_blocks_where",
    "beam_children",
    "beam_mask_hits",
    "beam_chosen",
    "ngram_bans",
    "accept_and_next",
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "gemv",
    "GEMV_ACTIVATIONS",
    "GEMV_MAX_K",
    "GEMV_MAX_ROWS",
    "norm_gemv",
    "use_triton",
    "prefers_absorbed_cross",
    "SHARED_KV_TILE_ROWS",
    "SPLIT_PARTIALS_MAX_BYTES",
    "FP8_DTYPE",
]


def use_triton(t) -> bool:
    """Whether the Triton kernels serve tensor ``t`` (CUDA and not forced to the reference)."""
    if not t.is_cuda or os.environ.get("ENCDEC_KERNELS", "triton") == "reference":
        return False
    try:
        import encdec_kernels.common  # noqa: F401  (imports triton)
    except ImportError:
        return False
    return True


def _impl(t, triton_module: str):
    """The module implementing a kernel for tensor ``t``: Triton's on CUDA, else the reference."""
    if use_triton(t):
        return importlib.import_module(f"encdec_kernels.{triton_module}")
    return reference


_REFERENCE_ONLY_LOGGED: set[str] = set()


def _reference_only(what: str):
    """The reference module, for attention features the Triton kernels do not have yet (the encoder's
    sliding window, Gemma's score soft-capping); logged once per feature, since it is slow on a GPU."""
    if what not in _REFERENCE_ONLY_LOGGED:
        _REFERENCE_ONLY_LOGGED.add(what)
        logging.getLogger("encdec").warning(
            "%s: the Triton attention kernels do not implement it; this model's attention runs on the "
            "plain-PyTorch reference (correct, slower)",
            what,
        )
    return reference


def _attention_impl(q, triton_module: str, window, softcap):
    if (window is not None or softcap is not None) and use_triton(q):
        return _reference_only("sliding-window attention" if window is not None else "attention soft-capping")
    return _impl(q, triton_module)


def varlen_attention(
    q, k, v, cu_seqlens, max_seqlen, *, scale, causal=False, rel_bias=None, window=None, softcap=None
):
    extra = {} if window is None and softcap is None else {"window": window, "softcap": softcap}
    return _attention_impl(q, "varlen", window, softcap).varlen_attention(
        q, k, v, cu_seqlens, max_seqlen, scale=scale, causal=causal, rel_bias=rel_bias, **extra
    )


def paged_attention(
    q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, *, scale, causal, rel_bias=None,
    window=None, softcap=None, return_lse=False, k_scales=None, v_scales=None,
):  # fmt: skip
    """See ``reference.paged_attention``; return_lse=True returns (out, lse [Tq, H] natural logs)."""
    extra = {} if window is None and softcap is None else {"window": window, "softcap": softcap}
    if return_lse:
        extra["return_lse"] = True
    if k_scales is not None:
        extra.update(k_scales=k_scales, v_scales=v_scales)
    if softcap is None and (causal or window is None) and use_triton(q):  # the kernel has causal windows
        extra.pop("softcap", None)
        return _impl(q, "paged").paged_attention(
            q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q,
            scale=scale, causal=causal, rel_bias=rel_bias, **extra,
        )  # fmt: skip
    return _attention_impl(q, "paged", window, softcap).paged_attention(
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q,
        scale=scale, causal=causal, rel_bias=rel_bias, **extra,
    )  # fmt: skip


def merge_attention(o_a, lse_a, o_b, lse_b):
    """One softmax over two attentions' keys from their (output, log-sum-exp) pairs
    (``reference.merge_attention``: elementwise tensor ops, any device)."""
    return reference.merge_attention(o_a, lse_a, o_b, lse_b)


def shared_kv_attention(
    q, rows, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, *, scale, row_scales=None
):
    return _impl(q, "shared_kv").shared_kv_attention(
        q, rows, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, scale=scale, row_scales=row_scales
    )


def store_kv(k, v, k_cache, v_cache, slot_mapping, k_scales=None, v_scales=None):
    return _impl(k, "paged").store_kv(k, v, k_cache, v_cache, slot_mapping, k_scales, v_scales)


def store_rows(x, rows, slot_mapping, row_scales=None):
    return _impl(x, "shared_kv").store_rows(x, rows, slot_mapping, row_scales)


def copy_blocks_where(pool, src, dst, mask):
    """pool[:, dst[i]] = pool[:, src[i]] where mask[i], chosen on the device (``blocks.py``)."""
    return _impl(pool, "blocks").copy_blocks_where(pool, src, dst, mask)


def beam_children(self_tables, parents, fork, up, n, block_size):
    """A beam step's children's tables and slots, chosen on the device (``beams.py``)."""
    return _impl(up, "beams").beam_children(self_tables, parents, fork, up, n, block_size)


def beam_mask_hits(packed, info, vocab):
    """A beam step's candidate scores with the hits pushed down, on the device (``beams.py``)."""
    return _impl(packed, "beams").beam_mask_hits(packed, info, vocab)


def beam_chosen(packed, chosen, vocab):
    """The children of a beam step's chosen candidates, on the device (``beams.py``)."""
    return _impl(packed, "beams").beam_chosen(packed, chosen, vocab)


def ngram_bans(logits, tokens, lengths, n, rows=None):
    """The no-repeat-n-gram rule from the rows' token history, in place (``beams.py``)."""
    return _impl(logits, "beams").ngram_bans(logits, tokens, lengths, n, rows)


def accept_and_next(
    best, starts, last_drafts, base, ks, candidates, tables, block_size, row_first, row_end,
    tokens, positions, slots, next_k, rows, max_rows,
):  # fmt: skip
    """A verification step's greedy outcome and the next step's inputs, on the device (``verify.py``)."""
    return _impl(best, "verify").accept_and_next(
        best, starts, last_drafts, base, ks, candidates, tables, block_size, row_first, row_end,
        tokens, positions, slots, next_k, rows, max_rows,
    )  # fmt: skip


def prefers_absorbed_cross(
    device: torch.device,
    dtype: torch.dtype,
    num_heads: int,
    d_model: int,
    cache_dtype: torch.dtype | None = None,
) -> bool:
    """Whether absorbed cross-attention (``shared_kv_attention`` over the encoder output, d_model
    wide) should be a model's default here: only where the Hopper kernel runs it (fp16/bf16
    activations and rows, a shape it covers); the Triton kernel alone is slower than per-layer
    K/V. Not with an fp8 cache (``cache_dtype``, default ``dtype``): the Hopper kernel's fp8 form
    converts every row it reads and lost to per-layer fp8 K/V on an H100 (W1: RTFx 1,585 against
    2,117; the kernel at 256 sequences 734 us against 415 us on bf16 rows: benchmarks/README.md),
    so fp8 takes absorbed rows only when asked (``absorb_cross=True``, ``--cross absorbed``). Such
    a cache must hold finite rows after each sequence's last, to the end of its
    ``SHARED_KV_TILE_ROWS``-row tile."""
    cache_dtype = dtype if cache_dtype is None else cache_dtype
    if dtype not in (torch.float16, torch.bfloat16) or cache_dtype != dtype:
        return False
    try:
        from encdec_kernels import shared_kv_hopper
    except ImportError:  # no Triton
        return False
    return shared_kv_hopper.preferred(device, num_heads, d_model)


def layer_norm(x, weight, bias, eps):
    return _impl(x, "norm").layer_norm(x, weight, bias, eps)


def rms_norm(x, weight, eps):
    return _impl(x, "norm").rms_norm(x, weight, eps)


def add_layer_norm(x, residual, weight, bias, eps):
    return _impl(x, "norm").add_layer_norm(x, residual, weight, bias, eps)


def add_rms_norm(x, residual, weight, eps):
    return _impl(x, "norm").add_rms_norm(x, residual, weight, eps)


# activations (transformers ACT2FN names) that gemv / norm_gemv apply in the kernel
GEMV_ACTIVATIONS = frozenset({"relu", "gelu", "gelu_new", "gelu_pytorch_tanh"})
# most rows of x that the models send to gemv / norm_gemv on CUDA: up to 5, the one-row kernel taking
# them row by row (linear.GEMV_ROWS; with a norm, after the norm kernel): a batch-1 verification
# step's K + 1 rows at K 4, and decode steps of up to 5 sequences. On an H100, at 5 rows of Whisper
# large-v3's shapes it took 3.0-10.7 us against cuBLAS's 5.2-11.7 (norms and GELU included; fc2
# 10.6 against 10.0), and W5 with oracle drafts (alpha 0.7, K 4) ran 1.09x faster than with the
# rows on cuBLAS (two runs each on one machine, thirteenth session, benchmarks/README.md). The
# few-row tensor-core kernel (more rows, up to 16) lost to cuBLAS at every shape measured (H100:
# Whisper large-v3's fc1 at 9 rows 8.2 against 7.7 us, fc2 22 against 10 us; W5's verification
# steps 1.26x against 1.67x, W2's few-row tail steps 10 ms of GPU time more; split over K, the same
# 1.26x against 1.58x on an H200). ENCDEC_GEMV_ROWS=N (1 to 16, read at import) sends up to N rows
# to them (1: every step of two rows or more on cuBLAS)
GEMV_MAX_ROWS = max(1, min(16, int(os.environ.get("ENCDEC_GEMV_ROWS", "5"))))
# the self-attention's qkv projection on the one-row kernel also writes the step's K/V rows into the
# paged cache (one store_kv kernel fewer a decoder layer); ENCDEC_GEMV_KV_STORE=0 (read at import)
# leaves them to store_kv, to measure the difference
GEMV_KV_STORE = os.environ.get("ENCDEC_GEMV_KV_STORE", "1") != "0"
# widest input the one-row kernels are meant for: a program holds its weight rows' whole K in
# registers (two rows of 8192 bf16 over four warps = 128 values per thread); wider layers stay on
# cuBLAS
GEMV_MAX_K = 8192
# widest input for which they take several rows (each row of x is held in registers beside the
# weights); wider ones go to cuBLAS. With two warps a program, K 8192 (NLLB's fc2) spilled from 2
# rows on; with four (linear._tiles, above K 2,048) it compiles without spills up to 8 rows, but
# those rows are not measured against cuBLAS yet, so the limit stays at the widest measured
# (tests/kernels/test_linear_compile.py checks spills at this width)
GEMV_ROWS_MAX_K = 5120


def gemv(x, weight, bias=None, activation=None, kv_store=None):
    """act(x @ weight^T + bias) for x [M, K], M <= GEMV_MAX_ROWS (encdec_kernels/linear.py on CUDA).
    ``kv_store`` (k_cache, v_cache, slot_mapping): y is a self-attention's [q | k | v] and its k and
    v parts also go into the caches, as ``store_kv`` writes them (caches in a 16-bit dtype or
    float32)."""
    return _impl(x, "linear").gemv(x, weight, bias, activation, kv_store)


def norm_gemv(
    x, residual, norm_weight, norm_bias, eps, is_rms, weight, bias=None, activation=None, kv_store=None
):
    """(gemv(norm(x + residual)), x + residual) row by row; residual may be None."""
    return _impl(x, "linear").norm_gemv(
        x, residual, norm_weight, norm_bias, eps, is_rms, weight, bias, activation, kv_store
    )
