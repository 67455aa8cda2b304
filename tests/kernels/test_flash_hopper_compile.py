"""encdec_kernels/flash_hopper.py on a machine without a GPU: the Gluon kernel compiles for sm_90 with the
installed Triton (its own compiler and bundled ptxas), in each configuration below, and the
compiled code has the structure its speed comes from. Gluon kernels do not run in Triton's
interpreter, so their numerics are checked against the reference on a Hopper GPU
(tests/gpu/test_kernels_gpu.py::test_hopper_encoder_kernel*).

The compiles run in a fresh process without TRITON_INTERPRET: in this one, tests/kernels may
have imported triton in interpreter mode, which Gluon's compiler cannot use."""

from __future__ import annotations

import pytest

from encdec_kernels import flash_hopper
from tests.support.gluon_compile import H100_SHARED_BYTES, compile_in_subprocess

CASES = {
    "d64-bf16": (64, "bfloat16", None),  # the defaults (flash_hopper.CONFIGS)
    "d128-fp16": (128, "float16", None),
    "d64-2-consumers": (64, "float16", dict(CONSUMERS=2, REGS=240, PIPELINE=False, K_STAGES=2)),
    "d64-64-key-tiles": (64, "bfloat16", dict(BLOCK_N=64, K_STAGES=4, CONSUMERS=2, REGS=240, PIPELINE=True)),
}
SCRIPT = """
import json, sys, torch
from encdec_kernels import flash_hopper
from tests.support.gluon_compile import H100_SHARED_BYTES, compile_in_subprocess
out = {}
for name, (d, dtype, cfg) in json.loads(sys.argv[1]).items():
    k = flash_hopper.compile_offline(d, getattr(torch, dtype), cfg)
    ptx = k.asm["ptx"]
    out[name] = dict(shared=k.metadata.shared, setmaxnreg=ptx.count("setmaxnreg.inc"),
                     tma="cp.async.bulk.tensor" in ptx, wgmma="wgmma.mma_async" in ptx,
                     wait_one="wgmma.wait_group.sync.aligned 1;" in ptx, local=".local" in ptx)
print("RESULT " + json.dumps(out))
"""

pytestmark = pytest.mark.skipif(not flash_hopper.AVAILABLE, reason="this Triton has no Gluon")


@pytest.fixture(scope="module")
def compiled():
    return compile_in_subprocess(SCRIPT, CASES)


@pytest.mark.parametrize("case", list(CASES))
def test_compiles_for_hopper(compiled, case):
    head_dim, _, config = CASES[case]
    pipelined = {**flash_hopper.CONFIGS[head_dim], **(config or {})}["PIPELINE"]
    got = compiled[case]
    assert got["shared"] <= H100_SHARED_BYTES
    assert got["setmaxnreg"] >= 1  # the consumer warp groups take registers from the producer
    assert got["tma"] and got["wgmma"]  # TMA loads, asynchronous warp-group MMA
    # pipelined, the loop leaves P V in flight during the next tile's softmax (waits for all but
    # one product); otherwise every wait drains the tensor cores
    assert got["wait_one"] == pipelined
    assert not got["local"]  # no register spills


def test_never_taken_for_cpu_tensors():
    import torch

    q = torch.randn(8, 2, 64, dtype=torch.bfloat16)
    assert not flash_hopper.supports(q, q, q, False, None)


def test_compile_guard_logs_once_and_turns_the_kernel_off(caplog):
    """gluon_support.CompileGuard, as both Hopper kernels use it: a launch that does not compile
    returns False, logs why, and the kernel is not usable from then on (the Triton one serves)."""
    import torch
    from triton.compiler.errors import CompilationError

    from encdec_kernels.gluon_support import CompileGuard

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise CompilationError("", None, "AttributeError: a Gluon API this Triton lacks")

            return launch

    guard = CompileGuard("test")
    with caplog.at_level("WARNING", logger="encdec"):
        assert guard.launch(Broken(), (1,), 1, x=2) is False
    assert "a Gluon API this Triton lacks" in guard.failed
    assert "the test kernel does not compile" in caplog.text
    assert not guard.usable(torch.device("cuda"))
