"""What the Gluon kernels for Hopper (``flash_hopper.py``, ``shared_kv_hopper.py``) share: whether
Gluon is here, the names its API moved to between Triton releases, whether a kernel may run on a
device, the log-once compile guard, and the offline sm_90 compile.

The kernels fail softly: without Gluon (Triton before 3.6) ``AVAILABLE`` is False,
``ENCDEC_GLUON=0`` turns them off (to compare against the Triton kernels), and a kernel that does
not compile with the installed Triton is logged once and never tried again; the Triton kernel
serves in each case. Gluon kernels do not run in Triton's interpreter: CPU tests compile them for
sm_90 (``compile_sm90``), GPU tests check their numbers.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import triton
from triton.compiler.errors import CompilationError

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import tma

    # the TMA load is tma.async_load from Triton 3.7 on (3.6 also has the older name, later ones only this)
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    # the CTA (here: warp-group partition) barrier: gl.thread_barrier in Triton 3.6, gl.barrier from 3.9
    barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    # Gluon's API moves between releases: built and checked with 3.6 (GPU) and 3.9 (compile only)
    AVAILABLE = tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 6)
except (ImportError, ValueError):  # pragma: no cover - depends on the installed Triton
    AVAILABLE = False

__all__ = ["AVAILABLE", "ENV", "CompileGuard", "compile_sm90"]

ENV = "ENCDEC_GLUON"  # "0": never take the Gluon kernels (compare against the Triton ones)
log = logging.getLogger("encdec")

if AVAILABLE:
    GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16, torch.float8_e4m3fn: gl.float8e4nv}
    _TYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8e4nv"}

    @gluon.constexpr_function
    def mma_layout(n):
        """wgmma accumulator layout of a [64, n] tile on one warp group (4 warps)."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])

    def shared_layout(block, dtype: torch.dtype):
        """The default shared-memory layout of a TMA box of ``block`` elements of ``dtype``."""
        return gl.NVMMASharedLayout.get_default_for(list(block), GL_DTYPES[dtype])


@functools.lru_cache(maxsize=8)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


class CompileGuard:
    """Whether one Gluon kernel may run on a device, and its launches: a kernel that does not
    compile with the installed Triton (an API moved) is logged once and never tried again."""

    def __init__(self, name: str):
        self.name = name
        self.failed: str | None = None  # why the kernel did not compile here

    def usable(self, device: torch.device) -> bool:
        """Gluon here, not turned off (``ENCDEC_GLUON=0``), no compile failure so far, and
        ``device`` a Hopper GPU (sm_90)."""
        return (
            AVAILABLE
            and self.failed is None
            and device.type == "cuda"
            and torch.version.hip is None
            and os.environ.get(ENV, "1") != "0"
            and _capability(device)[0] == 9
        )

    def launch(self, kernel, grid, *args, **kwargs) -> bool:
        """``kernel[grid](*args, **kwargs)``; False if it does not compile with this Triton (logged,
        and ``usable`` is False from then on, so the caller's Triton kernel takes over)."""
        try:
            kernel[grid](*args, **kwargs)
        except CompilationError as e:  # an API change in a newer Triton: fall back, do not fail the job
            self.failed = str(e).strip().splitlines()[-1][:300]
            log.warning("the %s kernel does not compile with triton %s (%s); using the Triton kernel instead",
                        self.name, triton.__version__, self.failed)  # fmt: skip
            return False
        return True


def desc_type(dtype: torch.dtype, block) -> str:
    """Signature type of a TMA descriptor of ``block`` boxes (default shared layout), for compile_sm90."""
    return f"tensordesc<{_TYPE_NAMES[dtype]}{list(block)},{shared_layout(block, dtype)!r}>"


def ptr_type(dtype: torch.dtype) -> str:
    """Signature type of a pointer to ``dtype`` elements, for compile_sm90."""
    return "*" + _TYPE_NAMES[dtype]


def compile_sm90(kernel, signature: dict, constexprs: dict, num_warps: int = 4):
    """Compile a Gluon kernel for sm_90 on any machine, no GPU needed (Triton's own compiler and its
    bundled ptxas): CPU tests check that it builds with the installed Triton. ``signature``: the
    kernel's run-time arguments in order, name -> type; ``constexprs``: the constexpr arguments that
    follow them, name -> value. Returns Triton's compiled kernel (``.asm["ptx"]``, ``.metadata``)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    names = list(sig)
    src = GluonASTSource(kernel, sig, {(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
