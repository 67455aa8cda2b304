"""Block copies inside a paged cache chosen on the device: ``copy_blocks_where``.

A beam step whose next inputs are made on the device (``encdec_cli.engine.beam``) forks beams
there, so which blocks need a copy-on-write is known only on the device. A gather and scatter over
every candidate pair would move every pair's block; this kernel gives each (pair, chunk) a program
whose loads and stores are masked off unless the pair is selected, so only the selected blocks'
bytes move and the launch's shape depends on no tensor value (CUDA-graph safe, no host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _copy_blocks_kernel(POOL, SRC, DST, MASK, stride_c, stride_b, block_elems, BLOCK: tl.constexpr):
    pair = tl.program_id(0)
    chunk = tl.program_id(1).to(tl.int64)
    limit = block_elems * (tl.load(MASK + pair) != 0).to(tl.int32)  # 0: an unselected pair moves nothing
    src = tl.load(SRC + pair).to(tl.int64)
    dst = tl.load(DST + pair).to(tl.int64)
    base = POOL + chunk * stride_c
    for start in range(0, block_elems, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        keep = offs < limit
        vals = tl.load(base + src * stride_b + offs, mask=keep)
        tl.store(base + dst * stride_b + offs, vals, mask=keep)


def copy_blocks_where(pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, mask: torch.Tensor) -> None:
    """pool[:, dst[i]] = pool[:, src[i]] for every i with mask[i] (in place).

    pool: [C, NB, ...] with each [C, NB] entry's values contiguous (a KV pool viewed as
    [2 * layers, NB, BS, H, D], or its scales); src, dst: [P] integer tensors, mask: [P] bool, all
    on the pool's device. Destinations must be distinct and no destination may be a source."""
    if pool.dim() < 2 or pool.shape[1] == 0 or src.numel() == 0:
        return
    c, nb = pool.shape[:2]
    elems = pool[0, 0].numel()
    if pool.stride(1) < elems or pool[0, 0].stride(-1) != 1 or not pool[0, 0].is_contiguous():
        raise ValueError("copy_blocks_where: each block of the pool must be contiguous")
    bits = pool.view(_BITS[pool.element_size()])
    block = min(4096, triton.next_power_of_2(elems))
    _copy_blocks_kernel[(src.numel(), c)](
        bits, src, dst, mask.view(torch.uint8), bits.stride(0), bits.stride(1), elems, BLOCK=block
    )
