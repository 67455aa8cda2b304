"""encdec_kernels/shared_kv_hopper.py on a machine without a GPU: the Gluon absorbed cross-attention kernel
compiles for sm_90 with the installed Triton in the shapes the engine gives it, fits in an SM's
shared memory, and ptxas keeps it in registers. A spill was its one big slowdown: when every
wgmma's shared-memory descriptors were computed once before the tile loop, ptxas spilled them
and each product waited on reloading its descriptors (5x slower than the loads alone on an H100).
Numbers against the reference: tests/gpu/test_kernels_gpu.py::test_hopper_absorbed_* (bf16/fp16 rows),
tests/gpu/test_fp8_gpu.py::test_hopper_absorbed_cross_attention_fp8 (fp8 rows, ``--kv-dtype fp8``).

The fp8 variant converts each e4m3 chunk to fp16 for wgmma: with 128-column chunks in registers the
three-consumer shape (d 1280) ran out of registers (2.4 KB of spills, and ptxas serialized the
wgmmas), so it takes 64-column chunks (``DC_FP8``); it must spill no more than the bf16 kernel of
the same shape, keep its wgmmas asynchronous, and take no more shared memory than
``_shared_bytes`` says (``preferred`` decides on it: a launch past the limit would fail, not fall
back). Every form of it compiles (``_fp8_mode``: "ring", the default; "registers"; "producer").

Compiles run in a fresh process without TRITON_INTERPRET (tests/support/gluon_compile.py)."""

from __future__ import annotations

import pytest

from encdec_kernels import flash_hopper
from tests.support.gluon_compile import H100_SHARED_BYTES, compile_in_subprocess

# name: (d_model, heads, split, fp8 form (None: bf16 rows), rows per block: 2 x decoder layers x 16 rows,
# as the runner's pool)
CASES = {
    "whisper-large": (1280, 20, False, None, 1024),  # three consumer warp groups, the largest tile
    "whisper-large-split": (1280, 20, True, None, 1024),
    "bart-t5-large": (1024, 16, False, None, 1024),
    "whisper-tiny": (384, 6, True, None, 1024),
    # fp8 rows (the engine's default cross layout with --kv-dtype fp8 on Hopper): W1 decodes 256
    # sequences (one wave: no split) and splits the rows when the batch is small
    "whisper-large-fp8": (1280, 20, False, "ring", 1024),  # large-v3: 32 decoder layers
    "whisper-large-split-fp8": (1280, 20, True, "ring", 1024),
    "whisper-large-fp8-registers": (1280, 20, False, "registers", 1024),
    "whisper-large-fp8-producer": (1280, 20, False, "producer", 1024),
    "whisper-large-split-fp8-producer": (1280, 20, True, "producer", 1024),
    "bart-large-fp8": (1024, 16, False, "ring", 384),  # 12 decoder layers
    "bart-large-split-fp8": (1024, 16, True, "ring", 384),
    "whisper-tiny-fp8": (384, 6, True, "ring", 128),  # 4 decoder layers: one consumer
    "whisper-tiny-fp8-producer": (384, 6, True, "producer", 128),
}
SCRIPT = """
import json, sys
from encdec_kernels import shared_kv_hopper
from tests.support.gluon_compile import ptxas_sm90
out = {}
for name, (d, h, split, form, rows_per_block) in json.loads(sys.argv[1]).items():
    fp8 = form is not None
    shared_kv_hopper.FP8_PRODUCER_CONVERTS = form == "producer"  # the form _shared_bytes counts
    shared_kv_hopper.FP8_VALUES_SMEM = form != "registers"
    k = shared_kv_hopper.compile_offline(d, h, rows_per_block=rows_per_block, split=split, fp8=fp8,
                                         form=form)
    ptx = k.asm["ptx"]
    spill_bytes, ptxas_ok, info = ptxas_sm90(ptx)
    out[name] = dict(shared=k.metadata.shared, tma="cp.async.bulk.tensor" in ptx,
                     wgmma="wgmma.mma_async" in ptx, spill_bytes=spill_bytes, ptxas_ok=ptxas_ok,
                     e4m3="e4m3x2" in ptx, serialized="wgmma.mma_async instructions are serialized" in info,
                     model=shared_kv_hopper._shared_bytes(d, -(-h // shared_kv_hopper.GROUP), fp8))
    print(name, {k: v for k, v in out[name].items() if k != "ptxas_ok"}, file=sys.stderr)
print("RESULT " + json.dumps(out))
"""

pytestmark = pytest.mark.skipif(not flash_hopper.AVAILABLE, reason="this Triton has no Gluon")


@pytest.fixture(scope="module")
def compiled():
    return compile_in_subprocess(SCRIPT, CASES)


@pytest.mark.parametrize("case", list(CASES))
def test_compiles_for_hopper_without_spills(compiled, case):
    c = compiled[case]
    assert c["tma"] and c["wgmma"]
    assert c["shared"] <= H100_SHARED_BYTES
    assert c["ptxas_ok"], "ptxas printed no spill report"
    # Triton 3.6: none; 3.9: ~1 KB in the three-consumer shape (loop scalars); the hoisted-descriptor
    # version that ran 5x slow spilled 4.5-6.5 KB
    # the producer form converts in the producer warp group, which has 32 registers a thread:
    # Triton 3.9 spills 0.4-0.9 KB there, Triton 3.6 4.6 KB (Whisper large; it is off by default)
    assert c["spill_bytes"] < (8192 if case.endswith("-producer") else 2048)
    assert not c["serialized"], "ptxas serialized the wgmmas (too few registers)"
    assert c["e4m3"] == ("-fp8" in case)  # fp8 rows convert in hardware (cvt ... e4m3x2)
    # preferred() decides on _shared_bytes: it must not undercount (nor overcount by much)
    assert c["model"] - 2048 <= c["shared"] <= c["model"]


@pytest.mark.parametrize(
    "case", [c for c in CASES if "-fp8" in c and not c.endswith("-producer") and c.split("-fp8")[0] in CASES]
)
def test_fp8_variant_spills_about_as_little_as_bf16(compiled, case):
    """Converting the fp8 chunks costs about no more spills than the bf16 kernel of the same shape
    (Whisper large: Triton 3.9 56 B against 992 B; Triton 3.6 112 B against none)."""
    assert compiled[case]["spill_bytes"] <= compiled[case.split("-fp8")[0]]["spill_bytes"] + 256


def test_supports_only_what_the_kernel_covers():
    """The dispatch rule, on CPU-side shapes: a CPU tensor never, and preferred() (the engine's
    default for absorbed cross-attention) is False off CUDA."""
    import torch

    from encdec_kernels import shared_kv_hopper

    q = torch.zeros(20, 4, 1280).transpose(0, 1)
    rows = torch.zeros(64, 8, 16, 1280)
    assert not shared_kv_hopper.supports(q, rows)
    assert not shared_kv_hopper.supports(q, rows.to(torch.float8_e4m3fn), torch.ones(64, 8, 16))
    assert not shared_kv_hopper.preferred(torch.device("cpu"), 20, 1280)
    assert not shared_kv_hopper.preferred(torch.device("cpu"), 20, 1280, fp8=True)
