"""Input checks shared by the Triton launchers: a bad argument raises a ValueError that names
it, instead of a crash inside a kernel or a silently wrong result. No Triton import: the
input contracts here (``SHARED_KV_TILE_ROWS``) are read by the engine on any machine."""

from __future__ import annotations

import torch

from encdec_kernels.reference import RelBias

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# caches may also hold fp8 e4m3 values, with float32 scales (reference.quantize_rows)
CACHE_DTYPES = (*SUPPORTED_DTYPES, torch.float8_e4m3fn)
MAX_HEAD_DIM = 256  # largest head dim the attention tiles are sized for (one [BLOCK, D] tile per operand)
# shared_kv_attention on Hopper loads whole tiles of this many rows and masks only the scores, so
# the rows after a sequence's last one, to the end of its tile, must be finite (the engine writes
# zeros there)
SHARED_KV_TILE_ROWS = 64
SPLIT_PARTIALS_MAX_BYTES = 256 << 20  # one absorbed cross-attention call's float32 split partials


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


def check_scales(cache, scales, name, contiguous=False):
    """An fp8 cache comes with float32 scales of its shape without the last dim (one per row;
    ``contiguous``: a paged cache's [NB, BS, H], each block's scales dense, token-major or (the
    pool's) head-major, else contiguous in the last dim); other caches with none."""
    fp8 = cache.dtype == torch.float8_e4m3fn
    if scales is None:
        if fp8:
            raise ValueError(f"{name}: an fp8 cache needs its float32 scales ({name}_scales)")
        return
    if not fp8:
        raise ValueError(f"{name}_scales are for fp8 caches only; the cache is {cache.dtype}")
    if (
        not isinstance(scales, torch.Tensor)
        or scales.dtype != torch.float32
        or tuple(scales.shape) != tuple(cache.shape[:-1])
        or scales.device != cache.device
    ):
        desc = f"{scales.dtype} {tuple(scales.shape)}" if isinstance(scales, torch.Tensor) else type(scales)
        raise ValueError(
            f"{name}_scales must be float32 {tuple(cache.shape[:-1])} on {cache.device}, got {desc}"
        )
    if contiguous:
        nb, bs, h = scales.shape
        if scales.stride(0) != bs * h or scales.stride()[1:] not in ((h, 1), (1, bs)):
            raise ValueError(f"{name}_scales must hold each block's [BS, H] or [H, BS] scales contiguous")
    elif scales.shape[-1] > 1 and scales.stride(-1) != 1:
        raise ValueError(f"{name}_scales must be contiguous in the last dim")


def check_index(name, t, ndim, device):
    if not isinstance(t, torch.Tensor) or t.dim() != ndim or t.dtype != torch.int32:
        desc = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a {ndim}-dim int32 tensor, got {desc}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}; move all inputs to one device")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call .contiguous() on it")


def check_tables(block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, device):
    """The paged launchers' sequence tables: [B, max_blocks], [B] and [B+1] int32 on q's device,
    max_seqlen_q a Python int (reading it from the device would sync)."""
    check_index("block_tables", block_tables, 2, device)
    check_index("seq_lens", seq_lens, 1, device)
    check_index("cu_seqlens_q", cu_seqlens_q, 1, device)
    num_seqs = block_tables.shape[0]
    if seq_lens.shape[0] != num_seqs or cu_seqlens_q.shape[0] != num_seqs + 1:
        raise ValueError(
            f"block_tables [B={num_seqs}, ...] needs seq_lens [B] and cu_seqlens_q [B+1], got "
            f"{tuple(seq_lens.shape)} and {tuple(cu_seqlens_q.shape)}"
        )
    if isinstance(max_seqlen_q, torch.Tensor) or not isinstance(max_seqlen_q, int) or max_seqlen_q < 0:
        raise ValueError(f"max_seqlen_q must be a python int >= 0 (no device sync), got {max_seqlen_q!r}")


def check_scale(scale):
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"scale must be a python float (no device sync), got {type(scale).__name__}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0 (it is folded into the softmax max), got {scale!r}")


def check_head_dim(d):
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} not supported: must be in 1..{MAX_HEAD_DIM}")


def check_rel_bias(rel_bias: RelBias | None, num_heads: int, device: torch.device) -> None:
    if rel_bias is None:
        return
    if not isinstance(rel_bias, RelBias):
        raise ValueError(f"rel_bias must be a encdec_kernels.RelBias, got {type(rel_bias).__name__}")
    table = rel_bias.table
    check_tensor("rel_bias.table", table, 2, dtypes=(torch.float32,), device=device)
    if table.shape != (num_heads, rel_bias.num_buckets):
        raise ValueError(
            f"rel_bias.table must be [H={num_heads}, num_buckets={rel_bias.num_buckets}], "
            f"got {tuple(table.shape)}"
        )
    half = rel_bias.num_buckets // 2 if rel_bias.bidirectional else rel_bias.num_buckets
    if half < 2 or rel_bias.max_distance <= half // 2:
        raise ValueError(
            f"rel_bias needs num_buckets >= {4 if rel_bias.bidirectional else 2} and max_distance > "
            f"num_buckets{' // 2' if rel_bias.bidirectional else ''} // 2 (the exact range), got "
            f"num_buckets={rel_bias.num_buckets}, max_distance={rel_bias.max_distance}"
        )
