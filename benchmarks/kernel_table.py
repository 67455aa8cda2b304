"""Triton kernels vs torch SDPA / torch ops on the standard shapes (CUDA only).

    python benchmarks/kernel_table.py --out benchmarks/results/kernels-<device>.json

Workloads (bf16, random data, seed 0):
- encoder attention: Whisper large-v3 (20 heads x 64, 1500 tokens, batch 64); T5 (16 x 64,
  64 sequences of rng(1).integers(260, 441) tokens) without and with the relative position
  bias. SDPA runs on the padded [B, H, L, D] batch with a key-padding mask (what transformers
  does); with bias it gets the materialised [B, H, L, L] bias (padding folded in), built
  outside the timed region. Reported as TFLOP/s on the real (unpadded) lengths; ours is
  autotuned on its first (untimed) call, and the config it picked plus every config's time are
  printed below the table and kept in the JSON.
- decode attention: batch 256, Whisper heads; cross (1500 keys) and self (lengths
  rng(2).integers(1, 201) + the new tokens, block size 16) with k = 1 and 4 query tokens, plus
  T5 self-attention with bias, batch 1 cross (split-KV on/off), and the one-query reduction
  path (SINGLE_QUERY_DOT=False) next to the default tl.dot path. Reported as GB/s on the
  bytes that must move (K/V read + q read + out written) and as a fraction of the device copy
  bandwidth measured here (a 1 GiB device-to-device copy, read + write bytes). SDPA baseline:
  contiguous (unpaged) [B, H, L, D] K/V. Both are timed as CUDA-graph replays, as the engine
  runs decode steps (so small cases measure the GPU, not Python launch overhead).
- norms: LayerNorm / RMSNorm (+ residual) on [96000, 1280] vs the torch ops.
- one-row linear layers (batch-1 decoding): encdec_kernels.linear's gemv (+ GELU, + fused add + LayerNorm)
  on the Whisper large-v3 decoder weights vs cuBLAS (F.linear, after our norm kernel), CUDA-graph
  timings over cycling weight copies (120 MB, beyond the L2 cache, as in a decode step); GB/s on
  the weight bytes.

Targets (H100): encoder >= 1.0x SDPA without bias, >= 3x SDPA with materialised bias;
decode (batch 256) >= 70% of copy bandwidth; the batch-1 rows are reported without a target.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.kernel_rows import (  # noqa: E402
    DEVICE,
    DTYPE,
    WHISPER_BATCH,
    WHISPER_FRAMES,
    WHISPER_HEADS,
    bench,
    linear_cases,
    norm_cases,
)
from encdec_cli.tasks.bench import copy_bandwidth  # noqa: E402

HEAD_DIM = 64
T5_HEADS, T5_BATCH = 16, 64  # flan-t5-large
T5_BUCKETS, T5_MAX_DISTANCE = 32, 128  # T5 relative attention config
DECODE_BATCH, CROSS_LEN, SELF_MAX = 256, 1500, 200
BLOCK_SIZE = 16  # default cache block size
ENCODER_TARGET, ENCODER_BIAS_TARGET, DECODE_TARGET = 1.0, 3.0, 0.70


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def pack(lens):
    return torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32, device=DEVICE)


def padded_views(x, lens, max_len):
    """Packed [T, H, D] -> padded [B, H, L, D] (a copy, zeros in the padding)."""
    out = x.new_zeros(len(lens), max_len, *x.shape[1:])
    start = 0
    for b, n in enumerate(lens):
        out[b, :n] = x[start : start + n]
        start += n
    return out.transpose(1, 2)


# -- encoder -----------------------------------------------------------------------------------


def encoder_case(name, lens, heads, with_bias, varlen, reference):
    t = sum(lens)
    max_len = max(lens)
    q, k, v = (torch.randn(t, heads, HEAD_DIM, device=DEVICE, dtype=DTYPE) for _ in range(3))
    cu = pack(lens)
    scale = 1.0 if with_bias else HEAD_DIM**-0.5
    rb = None
    if with_bias:
        table = torch.randn(heads, T5_BUCKETS, device=DEVICE)
        rb = reference.RelBias(table, T5_BUCKETS, T5_MAX_DISTANCE, True)
    ours = bench(lambda: varlen.varlen_attention(q, k, v, cu, max_len, scale=scale, rel_bias=rb))
    from encdec_kernels import flash_hopper, gluon_support

    hopper = max_len >= varlen.HOPPER_MIN_SEQLEN and flash_hopper.supports(q, k, v, False, rb)
    triton_ms = None
    if hopper:  # the Gluon kernel ran: time the Triton one too (what other GPUs get)
        os.environ[gluon_support.ENV] = "0"
        try:
            triton_ms = bench(lambda: varlen.varlen_attention(q, k, v, cu, max_len, scale=scale, rel_bias=rb))
        finally:
            del os.environ[gluon_support.ENV]
    config, timings = autotune_choice(varlen)

    uniform = all(n == max_len for n in lens)
    if uniform:  # zero-copy [B, H, L, D] views of the packed tensors, no mask: flash backend
        qp, kp, vp = (x.view(len(lens), max_len, heads, HEAD_DIM).transpose(1, 2) for x in (q, k, v))
    else:
        qp, kp, vp = (padded_views(x, lens, max_len) for x in (q, k, v))
    lens_t = torch.tensor(lens, device=DEVICE)
    key_ok = torch.arange(max_len, device=DEVICE)[None, :] < lens_t[:, None]  # [B, L]
    mask = None
    if with_bias:
        pos = torch.arange(max_len, device=DEVICE)
        bias = reference.bias_matrix(rb, pos, pos)  # [H, L, L] float32
        mask = bias[None].expand(len(lens), -1, -1, -1).to(DTYPE).clone()  # [B, H, L, L] materialised
        mask.masked_fill_(~key_ok[:, None, None, :], float("-inf"))
    elif not uniform:
        mask = key_ok[:, None, None, :]  # key padding mask
    base = bench(lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale))
    # sanity: both compute the same thing (real rows only)
    got = varlen.varlen_attention(q, k, v, cu, max_len, scale=scale, rel_bias=rb)
    want = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale).transpose(1, 2)
    want = torch.cat([want[b, :n] for b, n in enumerate(lens)])

    flops = sum(4 * heads * n * n * HEAD_DIM for n in lens)
    target = ENCODER_BIAS_TARGET if with_bias else ENCODER_TARGET
    ratio = base / ours
    return dict(
        rel_err_vs_sdpa=rel_err(got, want),
        name=name,
        kind="encoder",
        kernel="gluon (encdec_kernels/flash_hopper.py)" if hopper else "triton",
        triton_ms=triton_ms,
        ours_ms=ours,
        baseline_ms=base,
        baseline="sdpa"
        + (
            " + materialised [B,H,L,L] bias" if with_bias else (" (padded + key mask)" if not uniform else "")
        ),
        ratio=ratio,
        ours_tflops=flops / (ours * 1e-3) / 1e12,
        baseline_tflops=flops / (base * 1e-3) / 1e12,
        target=f">= {target}x sdpa",
        meets_target=ratio >= target,
        config=config,
        config_timings_ms=timings,
    )


def config_name(c) -> str:
    return f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"


def autotune_choice(varlen):
    """(config varlen_attention ran with, {config: ms} of the autotuning that chose it)."""
    if not varlen._autotune_enabled():
        return "fixed (ENCDEC_AUTOTUNE=0)", {}
    tuner = varlen._varlen_attn_tuned
    timings = {
        config_name(c): float(t[0] if isinstance(t, (list, tuple)) else t)
        for c, t in (getattr(tuner, "configs_timings", None) or {}).items()
    }
    return config_name(tuner.best_config), timings


# -- decode ------------------------------------------------------------------------------------


def paged_cache(seq_lens, heads, gen):
    """Random K/V for each sequence in shuffled blocks of a pool: (k_cache, v_cache, block_tables)."""
    nblk = [math.ceil(n / BLOCK_SIZE) for n in seq_lens]
    pool = sum(nblk)
    k_cache = torch.randn(pool, BLOCK_SIZE, heads, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    perm = torch.from_numpy(gen.permutation(pool)).to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(nblk), dtype=torch.int32)
    used = 0
    for b, n in enumerate(nblk):
        tables[b, :n] = perm[used : used + n]
        used += n
    return k_cache, v_cache, tables.to(DEVICE)


def contiguous_kv(k_cache, tables, seq_lens, max_len):
    """Unpaged [B, H, L, D] copy of every sequence's keys (SDPA's input layout)."""
    b = len(seq_lens)
    out = k_cache[tables.long()].reshape(b, -1, *k_cache.shape[2:])[:, :max_len]
    return out.transpose(1, 2).contiguous()


def decode_case(
    name, seq_lens, q_len, heads, causal, with_bias, paged, reference, copy_bw, gen, num_splits=None,
    has_target=True,
):  # fmt: skip
    b = len(seq_lens)
    max_len = max(seq_lens)
    k_cache, v_cache, tables = paged_cache(seq_lens, heads, gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    cu_q = torch.arange(0, (b + 1) * q_len, q_len, dtype=torch.int32, device=DEVICE)
    q = torch.randn(b * q_len, heads, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    scale = 1.0 if with_bias else HEAD_DIM**-0.5
    rb = None
    if with_bias:
        rb = reference.RelBias(
            torch.randn(heads, T5_BUCKETS, device=DEVICE), T5_BUCKETS, T5_MAX_DISTANCE, False
        )
    # _launch_paged: paged_attention minus the input checks, with an optional forced split count
    fn = lambda: paged._launch_paged(  # noqa: E731
        q, k_cache, v_cache, tables, lens, cu_q, q_len, scale, causal, rb, num_splits=num_splits
    )
    ours = bench(fn, graph=True)

    kp = contiguous_kv(k_cache, tables, seq_lens, max_len)
    vp = contiguous_kv(v_cache, tables, seq_lens, max_len)
    qp = q.view(b, q_len, heads, HEAD_DIM).transpose(1, 2)
    key_pos = torch.arange(max_len, device=DEVICE)
    q_pos = lens[:, None].long() - q_len + torch.arange(q_len, device=DEVICE)[None, :]  # [B, k]
    keep = key_pos[None, None, :] < lens[:, None, None]  # [B, 1, L]
    if causal:
        keep = keep & (key_pos[None, None, :] <= q_pos[:, :, None])  # [B, k, L]
    uniform = all(n == max_len for n in seq_lens) and not causal
    mask = None if uniform else keep[:, None]  # [B, 1, k, L]
    if with_bias:
        bias = torch.stack([reference.bias_matrix(rb, q_pos[i], key_pos) for i in range(b)])  # [B, H, k, L]
        mask = bias.to(DTYPE).masked_fill(~keep[:, None], float("-inf"))
    base = bench(lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale), graph=True)
    got = fn()  # sanity: both compute the same thing
    want = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale).transpose(1, 2)
    want = want.reshape(b * q_len, heads, HEAD_DIM)

    elt = torch.finfo(DTYPE).bits // 8
    moved = (2 * sum(seq_lens) + 2 * b * q_len) * heads * HEAD_DIM * elt  # K + V read, q read + out written
    gbps = moved / (ours * 1e-3) / 1e9
    frac = moved / (ours * 1e-3) / copy_bw
    res = dict(
        rel_err_vs_sdpa=rel_err(got, want),
        name=name,
        kind="decode",
        ours_ms=ours,
        baseline_ms=base,
        baseline="sdpa on contiguous K/V"
        + ("" if mask is None else " + mask" if not with_bias else " + materialised bias"),
        ratio=base / ours,
        ours_GBps=gbps,
        baseline_GBps=moved / (base * 1e-3) / 1e9,
        copy_fraction=frac,
        target=f">= {DECODE_TARGET:.0%} of copy bandwidth",
        meets_target=frac >= DECODE_TARGET,
    )
    if not has_target:  # batch 1: two launches of a few microseconds, latency-bound (no target)
        del res["target"], res["meets_target"]
    return res


# -- norms -------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, help="JSON results file (default: print only)")
    parser.add_argument("--only", choices=["encoder", "decode", "norm", "linear"], help="run one group")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernel_table.py needs a CUDA device")

    import triton

    from encdec_kernels import norm, paged, reference, varlen

    torch.manual_seed(0)
    gen = np.random.default_rng(0)
    t0 = time.time()
    copy_bw = copy_bandwidth()
    results = []
    if args.only in (None, "encoder"):
        t5_lens = np.random.default_rng(1).integers(260, 441, size=T5_BATCH).tolist()
        results.append(
            encoder_case(
                "whisper-large-v3 encoder 64x1500, 20x64",
                [WHISPER_FRAMES] * WHISPER_BATCH,
                WHISPER_HEADS,
                False,
                varlen,
                reference,
            )
        )
        results.append(
            encoder_case("t5 encoder 64 x 260-440, 16x64", t5_lens, T5_HEADS, False, varlen, reference)
        )
        results.append(
            encoder_case(
                "t5 encoder 64 x 260-440, 16x64, rel bias", t5_lens, T5_HEADS, True, varlen, reference
            )
        )
    if args.only in (None, "decode"):
        self_base = np.random.default_rng(2).integers(1, SELF_MAX + 1, size=DECODE_BATCH).tolist()
        for k in (1, 4):
            results.append(
                decode_case(
                    f"cross decode b{DECODE_BATCH} L{CROSS_LEN} k={k}",
                    [CROSS_LEN] * DECODE_BATCH,
                    k,
                    WHISPER_HEADS,
                    False,
                    False,
                    paged,
                    reference,
                    copy_bw,
                    gen,
                )
            )
            results.append(
                decode_case(
                    f"self decode b{DECODE_BATCH} L<=200 k={k}",
                    [n + k for n in self_base],
                    k,
                    WHISPER_HEADS,
                    True,
                    False,
                    paged,
                    reference,
                    copy_bw,
                    gen,
                )
            )
        results.append(
            decode_case(
                f"t5 self decode b{DECODE_BATCH} L<=200 k=1, rel bias",
                [n + 1 for n in self_base],
                1,
                T5_HEADS,
                True,
                True,
                paged,
                reference,
                copy_bw,
                gen,
            )
        )
        default_dot = paged.SINGLE_QUERY_DOT
        paged.SINGLE_QUERY_DOT = False  # the alternative k=1 path, to compare with the default
        for name, lens, causal in (
            (
                f"cross decode b{DECODE_BATCH} L{CROSS_LEN} k=1 (reduction path)",
                [CROSS_LEN] * DECODE_BATCH,
                False,
            ),
            (f"self decode b{DECODE_BATCH} L<=200 k=1 (reduction path)", [n + 1 for n in self_base], True),
        ):
            results.append(
                decode_case(name, lens, 1, WHISPER_HEADS, causal, False, paged, reference, copy_bw, gen)
            )
        paged.SINGLE_QUERY_DOT = default_dot
        for splits in (None, 1):
            label = "auto split-KV" if splits is None else "no split"
            results.append(
                decode_case(
                    f"cross decode b1 L{CROSS_LEN} k=1 ({label})",
                    [CROSS_LEN],
                    1,
                    WHISPER_HEADS,
                    False,
                    False,
                    paged,
                    reference,
                    copy_bw,
                    gen,
                    num_splits=splits,
                    has_target=False,
                )
            )
    if args.only in (None, "norm"):
        results.extend(norm_cases(norm, copy_bw))
    if args.only in (None, "linear"):
        results.extend(linear_cases(copy_bw))

    report = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        dtype=str(DTYPE),
        copy_bandwidth_GBps=copy_bw / 1e9,
        wall_s=time.time() - t0,
        results=results,
    )
    print(
        f"{report['device']}  torch {report['torch']}  triton {report['triton']}  "
        f"copy bandwidth {report['copy_bandwidth_GBps']:.0f} GB/s"
    )
    print(
        f"{'workload':<52} {'ours ms':>9} {'base ms':>9} {'ratio':>6} {'TFLOP/s':>8} {'GB/s':>7} {'copy%':>6}"
        "  target"
    )
    for r in results:
        tflops = f"{r['ours_tflops']:.0f}" if "ours_tflops" in r else ""
        gbps = f"{r['ours_GBps']:.0f}" if "ours_GBps" in r else ""
        frac = f"{r['copy_fraction']:.0%}" if "copy_fraction" in r else ""
        verdict = "" if "meets_target" not in r else ("ok  " if r["meets_target"] else "MISS ") + r["target"]
        if r.get("rel_err_vs_sdpa", 0.0) > 2e-2:
            verdict += f"  WRONG? rel err vs sdpa {r['rel_err_vs_sdpa']:.1e}"
        print(
            f"{r['name']:<52} {r['ours_ms']:>9.3f} {r['baseline_ms']:>9.3f} {r['ratio']:>6.2f} {tflops:>8} "
            f"{gbps:>7} {frac:>6}  {verdict}"
        )
    for r in results:
        if "config" in r:
            others = ", ".join(
                f"{c} {ms:.3f}" for c, ms in sorted(r["config_timings_ms"].items(), key=lambda x: x[1])
            )
            if r.get("triton_ms") is not None:
                slower = r["triton_ms"] / r["ours_ms"]
                print(f"  {r['name']}: {r['kernel']}; the Triton kernel {r['triton_ms']:.3f} ms "
                      f"({slower:.2f}x the time), its config {r['config']}")  # fmt: skip
            else:
                print(f"  {r['name']}: {r['config']}" + (f"  (autotune ms: {others})" if others else ""))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
