"""encdec_kernels/linear.py's one-row kernel on a machine without a GPU: compiled for sm_90 with the
installed Triton at Whisper large-v3's decoder shapes, one row (a plain batch-1 step) and five (a
verification step's K + 1 at K 4), and at the widest inputs the models send it, it keeps what its
speed rests on (benchmarks/README.md):

- no register spills (a program holds its weight rows' whole K in registers);
- the weight rows are loaded before the PDL wait, so they stream in while the previous kernel runs;
- the threads and warps lie along K, in 16-byte loads (coalesced weight reads);
- several rows cross the threads together: as many barriers at eight rows as at five (one
  reduction of a [rows padded to 8, BLOCK_N] result; before, each row had its own cross-warp sum:
  9 barriers at 5 rows);
- bfloat16 is widened to float32 by shifts, not by Triton's conversion, and each vector's products
  are summed in one chain of FMAs (at several rows the kernel is bound by its instructions).

Numbers against cuBLAS and the reference: tests/gpu/test_kernels_gpu.py (``-k gemv``). Compiles run in
a fresh process without TRITON_INTERPRET (tests/support/gluon_compile.py)."""

from __future__ import annotations

import pytest
import torch

import encdec_kernels
from encdec_kernels import linear
from tests.support.gluon_compile import compile_in_subprocess

# name: (N, K, rows, norm (1 LayerNorm with the residual), kv_store, activation)
CASES = {
    f"{layer}-{rows}": (n, k, rows, norm, kv, act)
    for layer, (n, k, norm, kv, act) in {
        "qkv": (3840, 1280, 1, True, None),  # one row: the norm and the K/V store fused
        "qkv-plain": (3840, 1280, 0, True, None),  # several rows: after the norm kernel
        "fc1": (5120, 1280, 0, False, "gelu"),
        "fc2": (1280, 5120, 0, False, None),
    }.items()
    for rows in (1, 5, 8)
    if not (norm and rows > 1)  # several rows with a norm take the norm kernel first
}
# the widest inputs the models send: GEMV_MAX_K at one row (NLLB's fc2), GEMV_ROWS_MAX_K at the
# most rows the one-row kernel takes (linear.GEMV_ROWS)
CASES["widest-1"] = (1024, encdec_kernels.GEMV_MAX_K, 1, 0, False, None)
CASES["widest-rows"] = (1280, encdec_kernels.GEMV_ROWS_MAX_K, linear.GEMV_ROWS, 0, False, None)
SCRIPT = r"""
import json, os, re, sys, warnings
os.environ.pop("TRITON_DEFAULT_FP_FUSION", None)  # encdec_kernels keeps Triton's FMA fusion on itself,
warnings.simplefilter("error", UserWarning)  # so Triton 3.9 has no warning to give about it
from encdec_kernels import linear
from tests.support.gluon_compile import ptxas_sm90
out = {}
for name, (n, k, rows, norm, kv, act) in json.loads(sys.argv[1]).items():
    c = linear.compile_offline(n, k, rows, norm=norm, residual=bool(norm), activation=act, kv_store=kv)
    ptx = c.asm["ptx"]
    assert "fma.rn.f32" in ptx  # the products fused into their sums
    spill_bytes, ptxas_ok, _ = ptxas_sm90(ptx)
    body = [line.strip() for line in ptx.splitlines()]
    wait = next(i for i, line in enumerate(body) if line.startswith("griddepcontrol.wait"))
    tiles = linear._gemv_tiles(n, k, rows, 2)
    threads = 32 * tiles["num_warps"]
    # the weight load's layout: the [BLOCK_N, CHUNKS, CHUNK] tile's threads and warps per axis
    ttgir = c.asm["ttgir"]
    layouts = dict(re.findall(r"^(#\w+) = #ttg\.blocked<(.*)>$", ttgir, re.M))
    loads = re.findall(r"tt\.load .*: tensor<((?:\d+x)+)!tt\.ptr<bf16>, (#\w+)>", ttgir)
    w_layout = max(loads, key=lambda shape_layout: shape_layout[0].count("x"))[1]  # the widest rank
    lay = {key: json.loads(v) for key, v in re.findall(r"(\w+) = (\[[\d, ]*\])", layouts[w_layout])}
    out[name] = dict(
        spill_bytes=spill_bytes, ptxas_ok=ptxas_ok,
        loads_before_wait=sum("ld.global" in line for line in body[:wait]),
        # 16-byte loads a thread
        weight_loads=tiles["BLOCK_N"] * tiles["CHUNKS"] * tiles["CHUNK"] // (tiles["VEC"] * threads),
        w_threads=lay["threadsPerWarp"], w_warps=lay["warpsPerCTA"], w_vec=lay["sizePerThread"],
        warps=tiles["num_warps"], vec=tiles["VEC"],
        barriers=sum(line.startswith("bar.sync") or line.startswith("barrier.sync") for line in body),
        widened_by_cvt=sum(line.startswith("cvt.f32.bf16") for line in body),
        fmas=sum(line.startswith("fma.rn.f32") for line in body),
        muls=sum(line.startswith(("mul.f32", "mul.rn.f32")) for line in body))
    print(name, out[name], file=sys.stderr)
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    return compile_in_subprocess(SCRIPT, CASES)


@pytest.mark.parametrize("case", list(CASES))
def test_compiles_for_hopper_without_spills_weights_before_the_wait(compiled, case):
    c = compiled[case]
    assert c["ptxas_ok"], "ptxas printed no spill report"
    assert c["spill_bytes"] == 0
    assert c["loads_before_wait"] >= c["weight_loads"]


@pytest.mark.parametrize("case", list(CASES))
def test_the_threads_lie_along_k_in_16_byte_loads(compiled, case):
    """Every thread and warp lies along K's contiguous axis, each loading 16 bytes at a time: a
    warp reads 512 consecutive bytes of a weight row. (K split into [.., threads, vector] axes,
    Triton 3.6 put threads on the outer axes: 1.6x the instructions, W5 a third slower on an H100.)"""
    c = compiled[case]
    outer = [1] * (len(c["w_threads"]) - 1)
    assert c["w_threads"] == [*outer, 32]
    assert c["w_warps"] == [*outer, c["warps"]]
    assert c["w_vec"] == [*outer, c["vec"]] and c["vec"] * 2 == 16


@pytest.mark.parametrize("layer", ["qkv-plain", "fc1", "fc2"])
def test_the_barriers_do_not_grow_with_the_rows(compiled, layer):
    """All rows' sums cross the threads in one reduction of a [rows padded to 8, BLOCK_N] result,
    not one cross-warp sum a row: eight rows take as many barriers as five."""
    assert compiled[f"{layer}-8"]["barriers"] == compiled[f"{layer}-5"]["barriers"]


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][3] == 0])
def test_bfloat16_is_widened_by_shifts(compiled, case):
    """x's and the weights' bfloat16 elements become float32 by a shift or a mask (``_widen``),
    never by Triton's conversion, which extracts every other element's half before shifting it:
    8% of a 5-row call's instructions at K 1,280 (Triton 3.6). Only the bias (a few elements a
    program) and a norm's prologue (not in these cases) use the conversion."""
    bias_elements = linear._gemv_tiles(*CASES[case][:3], 2)["BLOCK_N"]
    assert compiled[case]["widened_by_cvt"] <= bias_elements


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][3] == 0])
def test_the_products_are_summed_in_fma_chains(compiled, case):
    """Each 16-byte vector's 8 products are one chain of FMAs (one multiply, seven FMAs): at
    several rows the kernel is bound by its instructions. tl.sum's tree (Triton 3.9) fused only
    its leaves: as many multiplies as FMAs."""
    c = compiled[case]
    assert c["fmas"] >= 4 * c["muls"], c  # (the rest: the activation, the bias)


def test_several_rows_only_up_to_the_width_that_fits(monkeypatch):
    """The models send several rows to the one-row kernel only up to GEMV_ROWS_MAX_K (the widest
    measured against cuBLAS; cuBLAS takes wider ones); one row up to GEMV_MAX_K."""
    from encdec_models.layers import _few_rows

    monkeypatch.setattr(encdec_kernels, "use_triton", lambda x: True)
    rows, widest = encdec_kernels.GEMV_MAX_ROWS, encdec_kernels.GEMV_ROWS_MAX_K
    assert rows > 1 and widest < encdec_kernels.GEMV_MAX_K
    assert _few_rows(torch.empty(1, encdec_kernels.GEMV_MAX_K))
    assert _few_rows(torch.empty(rows, widest))
    assert not _few_rows(torch.empty(2, widest + 1))
    assert not _few_rows(torch.empty(1, encdec_kernels.GEMV_MAX_K + 1))
