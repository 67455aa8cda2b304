"""Plain-PyTorch versions of every kernel: the CPU path and the test oracle.

Each function has the same signature as its Triton twin in ``encdec_kernels/varlen.py``,
``paged.py``, ``shared_kv.py``, ``norm.py`` or ``linear.py``. Shapes use: T = packed tokens,
H = heads, D = head dim, B = sequences, NB = cache blocks, BS = block size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RelBias:
    """T5 relative position bias, computed per (query, key) pair from a per-head table.

    table: [H, num_buckets] float32. bidirectional: encoder (True) or causal decoder (False).
    """

    table: torch.Tensor
    num_buckets: int
    max_distance: int
    bidirectional: bool


def relative_position_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int, bidirectional: bool):
    """T5's bucket of ``rel = key_pos - query_pos`` (same arithmetic as transformers)."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).to(rel.dtype) * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    large = max_exact + (
        torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(rel.dtype)
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, rel, large)


def bias_matrix(bias: RelBias, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[H, Lq, Lk] additive bias for query positions q_pos [Lq] and key positions k_pos [Lk]."""
    rel = k_pos[None, :].long() - q_pos[:, None].long()
    b = relative_position_bucket(rel, bias.num_buckets, bias.max_distance, bias.bidirectional)
    return bias.table[:, b]  # [H, Lq, Lk]


def _attend(q, k, v, scale, mask=None, bias=None, softcap=None, return_lse=False):
    """q: [Lq, H, D], k/v: [Lk, H, D], mask: [Lq, Lk] bool (True = keep), bias: [H, Lq, Lk];
    softcap: scores become softcap * tanh(scores / softcap) (Gemma). return_lse: also the natural
    log of each (query, head)'s softmax sum, [Lq, H] float32 (see ``merge_attention``)."""
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s + bias.float()
    if mask is not None:
        s = s.masked_fill(~mask[None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = torch.einsum("hqk,khd->qhd", p, v.float()).to(q.dtype)
    if return_lse:
        return out, torch.logsumexp(s, dim=-1).transpose(0, 1)
    return out


def merge_attention(o_a, lse_a, o_b, lse_b):
    """One softmax over the keys of two attentions from their separate results: o_a, o_b [T, H, D]
    (each normalised over its own keys), lse_a, lse_b [T, H] float32 natural logs of their softmax
    sums -> [T, H, D], each weighted by its share exp(lse) of the joint sum (T5Gemma 2's merged
    self + cross attention). Plain tensor ops: the same on every device."""
    m = torch.maximum(lse_a, lse_b)
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = w_a + w_b
    out = o_a.float() * (w_a / total)[..., None] + o_b.float() * (w_b / total)[..., None]
    return out.to(o_a.dtype)


def window_mask(q_pos, k_pos, causal: bool, window):
    """[Lq, Lk] bool keep-mask (None: keep all): causal keeps keys at or before the query; a
    sliding window keeps keys less than ``window`` positions away (|q - k| for non-causal). A
    non-causal window may be a pair (before, after): keys ``before`` or more positions before the
    query, or ``after`` or more after it, are masked (T5Gemma 2's encoder: an even window is one
    position longer ahead than behind)."""
    if not causal and window is None:
        return None
    dist = q_pos[:, None] - k_pos[None, :]
    keep = dist >= 0 if causal else torch.ones_like(dist, dtype=torch.bool)
    if window is not None:
        before, after = window if isinstance(window, tuple) else (window, window)
        keep &= dist < before
        if not causal:
            keep &= -dist < after
    return keep


def varlen_attention(
    q, k, v, cu_seqlens, max_seqlen, *, scale, causal=False, rel_bias=None, window=None, softcap=None
):
    """Attention over packed variable-length sequences (encoder / prefill).

    q, k, v: [T, H, D]; cu_seqlens: [B+1] int32 offsets; max_seqlen: int. Returns [T, H, D].
    causal: token i of a sequence sees tokens <= i. rel_bias: T5 bias (positions restart at 0
    in every sequence). window: keys ``window`` or more positions away are masked (sliding
    window); softcap: Gemma's score soft-capping.
    """
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for b in range(len(bounds) - 1):
        s, e = bounds[b], bounds[b + 1]
        if e == s:
            continue
        n = e - s
        pos = torch.arange(n, device=q.device)
        mask = window_mask(pos, pos, causal, window)
        bias = bias_matrix(rel_bias, pos, pos) if rel_bias is not None else None
        if window is not None or softcap is not None:
            o = _attend(q[s:e], k[s:e], v[s:e], scale, mask, bias, softcap)
        elif bias is None:
            o = F.scaled_dot_product_attention(
                q[s:e].transpose(0, 1),
                k[s:e].transpose(0, 1),
                v[s:e].transpose(0, 1),
                is_causal=causal,
                scale=scale,
            ).transpose(0, 1)
        else:
            o = _attend(q[s:e], k[s:e], v[s:e], scale, mask, bias)
        out[s:e] = o
    return out


# fp8 caches (``EngineConfig.kv_dtype``): e4m3 values with one float32 scale per row of the last
# dim (a (token, head) row of D for K/V caches, an encoder row of d_model for the absorbed row
# cache). A row x is stored as round(x / s) with s = max|x| / FP8_MAX (1 for an all-zero row) and
# read as fp8 * s. The scale tensors have the cache's shape without its last dim.
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (fp8 values [..., D], float32 scales [...]), one scale per row."""
    xf = x.float()
    amax = xf.abs().amax(-1)
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (xf / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), s


def dequantize_rows(x: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """fp8 values [..., D] and their scales [...] -> float32 (x itself when scales is None)."""
    return x if scales is None else x.float() * scales[..., None].float()


def _raw(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors as uint8 bytes (indexing and index-assignment are not implemented for float8 on
    every device); other dtypes unchanged."""
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


def _gather(t: torch.Tensor, index) -> torch.Tensor:
    """t[index] for any dtype (fp8 through its bytes)."""
    return _raw(t)[index].view(t.dtype)


def _quantize_for(cache: torch.Tensor, scales, x: torch.Tensor, what: str):
    """x cast for ``cache`` ([N, ...] values to write; fp8 caches: quantized) and the scales to
    write with them (None unless fp8)."""
    if cache.dtype != FP8_DTYPE:
        if scales is not None:
            raise ValueError(f"{what}: scales are for fp8 caches only, the cache is {cache.dtype}")
        return x.to(cache.dtype), None
    if scales is None:
        raise ValueError(f"{what}: an fp8 cache needs its float32 scales")
    return quantize_rows(x)


def store_kv(k, v, k_cache, v_cache, slot_mapping, k_scales=None, v_scales=None):
    """Write new K/V rows into cache slots.

    k, v: [N, H, D]; k_cache, v_cache: [NB, BS, H, D]; slot_mapping: [N] int64, slot =
    block * BS + offset, -1 = skip (padding). fp8 caches: each (token, head) row is quantized with
    its own scale, written to k_scales / v_scales [NB, BS, H] float32 (any strides).
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    bs = k_cache.shape[1]
    for x, cache, sc, name in ((k, k_cache, k_scales, "k_cache"), (v, v_cache, v_scales, "v_cache")):
        vals, s = _quantize_for(cache, sc, x[keep], name)
        _raw(cache).view(-1, *cache.shape[2:])[slots] = _raw(vals)
        if s is not None:
            sc[slots // bs, slots % bs] = s


def store_rows(x, rows, slot_mapping, row_scales=None):
    """Write rows x [N, d] into a row cache rows [C, NB, RC, d]: slot = (c * NB + block) * RC + r
    puts x[i] at rows[c, block, r]; -1 = skip. fp8 rows: each row quantized with its own scale,
    written to row_scales [C, NB, RC] float32."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    nb, rc = rows.shape[1], rows.shape[2]
    vals, s = _quantize_for(rows, row_scales, x[keep], "rows")
    index = (slots // (nb * rc), slots // rc % nb, slots % rc)
    _raw(rows)[index] = _raw(vals)
    if s is not None:
        row_scales[index] = s


def gather_paged(cache, block_table, n):
    """First n rows of one sequence's paged cache [NB, BS, ...]: [n, ...]."""
    bs = cache.shape[1]
    nblk = (n + bs - 1) // bs
    return _gather(cache, block_table[:nblk].long()).reshape(-1, *cache.shape[2:])[:n]


def paged_attention(
    q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, *, scale, causal, rel_bias=None,
    window=None, softcap=None, return_lse=False, k_scales=None, v_scales=None,
):  # fmt: skip
    """Decoder attention over a paged cache: 1..k query tokens per sequence.

    q: [Tq, H, D] packed; sequence b owns q[cu_seqlens_q[b]:cu_seqlens_q[b+1]].
    k_cache, v_cache: [NB, BS, H, D]; block_tables: [B, max_blocks] int32; seq_lens: [B] int32 =
    number of keys of sequence b (already including the new tokens for self-attention).
    causal=True (self-attention): the i-th of q_len queries sits at position seq_len - q_len + i
    and sees keys at positions <= its own. causal=False (cross-attention): all seq_len keys.
    rel_bias: T5 causal bias on key_pos - query_pos. window: causal sliding window, keys
    ``window`` or more positions before the query are masked; softcap: Gemma's score soft-capping.
    k_scales, v_scales: [NB, BS, H] float32 scales of fp8 caches (values are read as fp8 * scale).
    Returns [Tq, H, D]; with return_lse, (out, lse [Tq, H] float32: the natural log of each
    query and head's softmax sum, for ``merge_attention``).
    """
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        if e == s:
            continue
        n = lens[b]
        k = gather_paged(k_cache, block_tables[b], n)
        v = gather_paged(v_cache, block_tables[b], n)
        if k_scales is not None:
            k = dequantize_rows(k, gather_paged(k_scales, block_tables[b], n))
            v = dequantize_rows(v, gather_paged(v_scales, block_tables[b], n))
        k_pos = torch.arange(n, device=q.device)
        q_pos = torch.arange(n - (e - s), n, device=q.device)
        mask = window_mask(q_pos, k_pos, causal, window)
        bias = bias_matrix(rel_bias, q_pos, k_pos) if rel_bias is not None else None
        if return_lse:
            out[s:e], lse[s:e] = _attend(q[s:e], k, v, scale, mask, bias, softcap, return_lse=True)
        else:
            out[s:e] = _attend(q[s:e], k, v, scale, mask, bias, softcap)
    return (out, lse) if return_lse else out


def gather_rows(rows, block_table, n):
    """First n rows of one sequence in a row cache [C, NB, RC, d] (see shared_kv_attention): [n, d]
    (or, for its scales [C, NB, RC], the first n scales [n])."""
    if rows.dim() == 3:
        return gather_rows(rows[..., None], block_table, n)[:, 0]
    per_block = rows.shape[0] * rows.shape[2]
    nblk = (n + per_block - 1) // per_block
    blocks = _raw(rows)[:, block_table[:nblk].long()].view(rows.dtype)  # [C, nblk, BS, d]
    return blocks.transpose(0, 1).reshape(-1, rows.shape[3])[:n]


def shared_kv_attention(
    q, rows, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, *, scale, row_scales=None
):
    """H query heads over one key head per sequence whose keys are also its values (absorbed
    cross-attention). q: [Tq, H, d]; rows: [C, NB, RC, d], block n of a sequence's table holding
    its rows n*C*RC + r at rows[r // RC, block, r % RC]; block_tables: [B, max_blocks] int32;
    seq_lens: [B] int32. row_scales: [C, NB, RC] float32 scales of fp8 rows (read as fp8 * scale).
    Returns [Tq, H, d]."""
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        if e == s:
            continue
        kv = gather_rows(rows, block_tables[b], lens[b])
        if row_scales is not None:
            kv = dequantize_rows(kv, gather_rows(row_scales, block_tables[b], lens[b]))
        kv = kv[:, None].expand(-1, q.shape[1], -1)
        out[s:e] = _attend(q[s:e], kv, kv, scale)
    return out


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last dim, computed in float32, returned in x's dtype."""
    return F.layer_norm(
        x.float(), x.shape[-1:], weight.float(), None if bias is None else bias.float(), eps
    ).to(x.dtype)


def rms_norm(x, weight, eps):
    """T5's RMSNorm (no mean subtraction, no bias), variance in float32 like transformers."""
    var = x.float().pow(2).mean(-1, keepdim=True)
    y = x.float() * torch.rsqrt(var + eps)
    return (weight.float() * y).to(x.dtype)


def add_layer_norm(x, residual, weight, bias, eps):
    """(layer_norm(x + residual), x + residual)."""
    s = x + residual
    return layer_norm(s, weight, bias, eps), s


def add_rms_norm(x, residual, weight, eps):
    """(rms_norm(x + residual), x + residual)."""
    s = x + residual
    return rms_norm(s, weight, eps), s


def apply_activation(y, name):
    """The epilogue activations of ``gemv`` by transformers ACT2FN name (None: identity)."""
    if name is None:
        return y
    if name == "relu":
        return F.relu(y)
    if name == "gelu":
        return F.gelu(y)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return F.gelu(y, approximate="tanh")
    raise ValueError(f"activation {name!r} not supported")


def gemv(x, weight, bias=None, activation=None, kv_store=None):
    """act(x @ weight^T + bias) for rows x [M, K] (float32 sums, output in x's dtype); with
    ``kv_store`` (k_cache, v_cache, slot_mapping) y = [q | k | v] and k, v go into the caches."""
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    y = apply_activation(y, activation).to(x.dtype)
    if kv_store is not None:
        k_cache, v_cache, slots = kv_store
        h, d = k_cache.shape[2:]
        _, k, v = y.view(-1, 3, h, d).unbind(1)
        store_kv(k, v, k_cache, v_cache, slots)
    return y


def norm_gemv(
    x, residual, norm_weight, norm_bias, eps, is_rms, weight, bias=None, activation=None, kv_store=None
):
    """(gemv(norm(s)), s) with s = x + residual (x when residual is None)."""
    s = x if residual is None else x + residual
    h = rms_norm(s, norm_weight, eps) if is_rms else layer_norm(s, norm_weight, norm_bias, eps)
    return gemv(h, weight, bias, activation, kv_store), s


def copy_blocks_where(pool, src, dst, mask):
    """pool[:, dst[i]] = pool[:, src[i]] where mask[i] (see ``blocks.copy_blocks_where``)."""
    keep = mask.nonzero()[:, 0]
    if len(keep):
        raw = _raw(pool)
        raw[:, dst[keep]] = raw[:, src[keep]]


def beam_children(self_tables, parents, fork, up, n, block_size):
    """The inputs of a beam step's children chosen on the device (see ``beams.beam_children``), in
    torch."""
    pos, fresh, spare = up[:n], up[n : 2 * n] > 0, up[2 * n :]
    tables = self_tables.index_select(0, parents)
    col, off = (pos // block_size)[:, None], pos % block_size
    here = tables.gather(1, col)[:, 0].long()  # the parent's block at the new position
    needs = fresh | fork
    take = (needs.long().cumsum(0) - 1).clamp_(0, max(len(spare) - 1, 0))
    block = torch.where(needs, spare.index_select(0, take), here) if len(spare) else here
    tables.scatter_(1, col, block[:, None].to(tables.dtype))
    return tables, here, block, needs & ~fresh, block * block_size + off, (pos + 1).to(torch.int32)


BEAM_NEG_LARGE = -1.0e9  # transformers' "impossible" beam score


def beam_mask_hits(packed, info, vocab):
    """The candidates' scores with the hits pushed down (see ``beams.beam_mask_hits``), in torch."""
    top_scores, cand_tok = packed[0].float(), packed[1].long() % vocab
    hits = (info[:, :1] > 0) | (cand_tok[:, :, None] == info[:, None, 1:]).any(-1)
    return top_scores + hits.float() * BEAM_NEG_LARGE


def beam_chosen(packed, chosen, vocab):
    """The children of the chosen candidates (see ``beams.beam_chosen``), in torch."""
    flat = packed[1].long().gather(1, chosen)  # [G, N]: beam * vocab + token
    parent, tokens = flat // vocab, flat % vocab
    num, n = chosen.shape
    earlier = torch.ones(n, n, dtype=torch.bool, device=chosen.device).tril_(-1)  # [i, j]: j < i
    fork = ((parent[:, :, None] == parent[:, None, :]) & earlier).any(-1)
    rows = parent + torch.arange(0, num * n, n, device=chosen.device)[:, None]
    return chosen.to(packed.dtype), rows.reshape(-1), tokens.reshape(-1), fork.reshape(-1)


def ngram_bans(logits, tokens, lengths, n, rows=None):
    """Set to -inf the tokens that would repeat an n-gram (see ``beams.ngram_bans``), in torch: a
    few whole-tensor ops; a token banned through one start and not another stays banned (a min
    reduction, not a plain scatter, whose order between duplicates is undefined on CUDA)."""
    m = n - 1
    starts = tokens.shape[1] - m  # start positions [0, starts) fit the buffer
    if starts <= 0 or len(logits) == 0:
        return
    if rows is not None:
        tokens, lengths = tokens.index_select(0, rows), lengths.index_select(0, rows)
    length = lengths.long()[:, None]
    last = (length - m + torch.arange(m, device=tokens.device)).clamp_(min=0)  # [B, m]: the last m tokens
    prefix = tokens.gather(1, last)
    match = torch.arange(starts, device=tokens.device) < length - m  # i + m < length: start i exists
    for j in range(m):
        match &= tokens[:, j : j + starts] == prefix[:, j : j + 1]
    banned = tokens[:, m:].clamp(min=0)
    value = torch.where(match, float("-inf"), float("inf"))
    if rows is None:
        logits.scatter_reduce_(1, banned, value, "amin")
    else:
        logits.index_copy_(0, rows, logits.index_select(0, rows).scatter_reduce_(1, banned, value, "amin"))


def accept_and_next(
    best, starts, last_drafts, base, ks, candidates, tables, block_size, row_first, row_end,
    tokens, positions, slots, next_k: int, rows: int, max_rows: int,
):  # fmt: skip
    """The greedy outcome of a verification step and the next step's inputs (see
    ``verify.accept_and_next``), in torch."""
    if max(rows, last_drafts.shape[1] + 1, next_k + 1) > max_rows:
        raise ValueError(f"accept_and_next: rows or drafts exceed max_rows {max_rows}")
    n, dev = len(ks), best.device
    last_k, width = last_drafts.shape[1], candidates.shape[1]
    j = torch.arange(last_k, device=dev)
    at = (starts[:, None] + j).clamp_(max=best.numel() - 1)
    agree = best[at] == last_drafts  # -1 (past a row's drafts) never equals a token
    accepted = agree.long().cumprod(1).sum(1) if last_k else torch.zeros(n, dtype=torch.long, device=dev)
    chosen = best[starts + accepted]
    i = torch.arange(next_k, device=dev)
    nxt = candidates.gather(1, (accepted[:, None] + i).clamp_(max=width - 1))
    drafts = torch.where(i < ks[:, None], nxt, -1)
    first_pos = base + accepted
    kv_lens = (first_pos + ks + 1).to(torch.int32)
    r = torch.arange(rows, device=dev)
    row = row_first[:, None] + r  # [B, rows]
    inside = row < row_end[:, None]
    jj = row - (row_end - 1 - ks)[:, None]
    real = inside & (jj >= 0)
    col = (accepted[:, None] + jj - 1).clamp(0, width - 1)
    tok = torch.where(jj == 0, chosen[:, None], torch.where(real, candidates.gather(1, col), 0))
    pos = torch.where(real, first_pos[:, None] + jj, first_pos[:, None])
    blk = tables.gather(1, torch.where(real, pos // block_size, 0)).long()
    slot = torch.where(real, blk * block_size + pos % block_size, -1)
    tokens[row[inside]] = tok[inside]
    positions[row[inside]] = pos[inside]
    slots[row[inside]] = slot[inside]
    return accepted, chosen, drafts, kv_lens
