"""Run the Triton kernels on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).

Triton reads ``TRITON_INTERPRET`` whenever a ``@triton.jit`` decorator runs, and its own
standard library (``tl.sum``, ``tl.cdiv``, ...) is decorated when ``triton`` is first imported.
So the variable must be set before anything in this pytest process imports triton; setting it
later gives interpreted kernels calling compiled library functions, which fails.

This conftest is imported when pytest collects ``tests/kernels`` and:
- sets ``TRITON_INTERPRET=1`` if triton is not imported yet and there is no CUDA device (on a
  GPU machine the variable would leak into later tests that run the real kernels);
- otherwise (triton already imported compiled, e.g. ``pytest tests/`` on a GPU machine after
  ``tests/gpu`` imported it), the kernel tests of this directory are skipped here and
  ``test_in_subprocess.py`` runs them in a fresh process with the variable set.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

triton = pytest.importorskip("triton")


def _triton_interprets() -> bool:
    """Whether triton (its standard library included) was imported in interpreter mode."""
    try:
        from triton.language import standard
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(getattr(standard, "cdiv", None), InterpretedFunction)


INTERPRETED = _triton_interprets()
NOT_INTERPRETED_REASON = (
    "triton was imported in this process without TRITON_INTERPRET=1 (or a GPU is present); "
    "tests/kernels/test_in_subprocess.py runs these tests in a fresh interpreter process"
)


def _patch_bf16_dot() -> bool:
    """Work around a Triton interpreter bug: ``tl.dot`` on bfloat16 multiplies the raw uint16
    storage (numpy has no bfloat16). Widen bf16 operands to float32 first (exact: a bf16 is the
    top half of an fp32). Patched only if a probe shows the bug; returns whether bf16 dots work."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    @triton.jit
    def probe(A, C):
        o = tl.arange(0, 16)
        a = tl.load(A + o[:, None] * 16 + o[None, :])
        tl.store(C + o[:, None] * 16 + o[None, :], tl.dot(a, a))

    def works():
        a = torch.eye(16, dtype=torch.bfloat16) * 2
        c = torch.zeros(16, 16)
        probe[(1,)](a, c)
        return torch.equal(c, torch.eye(16) * 4)

    if works():
        return True
    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "create_dot", None)
    if original is None:
        return False

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *args, **kwargs):
        return original(self, widen(a), widen(b), d, *args, **kwargs)

    builder.create_dot = create_dot
    if works():
        return True
    builder.create_dot = original
    return False


BF16_DOT_OK = _patch_bf16_dot() if INTERPRETED else False


def _interpreted_module(name):
    import importlib

    from triton.runtime.interpreter import InterpretedFunction

    module = importlib.import_module(f"encdec_kernels.{name}")
    kernels = [v for v in vars(module).values() if isinstance(v, (InterpretedFunction, triton.JITFunction))]
    if not kernels or not all(isinstance(k, InterpretedFunction) for k in kernels):
        pytest.fail(
            f"encdec_kernels.{name} was imported before TRITON_INTERPRET=1 was set; run tests/kernels alone"
        )
    return module


def _interpreted_fixture(module, name=None):
    """A session fixture ``name`` (default: the module's name): encdec_kernels.<module> with its
    kernels running in the Triton interpreter."""

    def fixture():
        if not INTERPRETED:
            pytest.skip(NOT_INTERPRETED_REASON)
        return _interpreted_module(module)

    fixture.__doc__ = f"encdec_kernels.{module} with its kernels running in the Triton interpreter."
    return pytest.fixture(scope="session", name=name or module)(fixture)


common = _interpreted_fixture("common")
varlen = _interpreted_fixture("varlen")
paged = _interpreted_fixture("paged")
shared_kv = _interpreted_fixture("shared_kv")
norm = _interpreted_fixture("norm")
lin = _interpreted_fixture("linear", "lin")
blocks = _interpreted_fixture("blocks")
verify = _interpreted_fixture("verify")
beams = _interpreted_fixture("beams")


@pytest.fixture(scope="session")
def bf16_dot_ok():
    """Whether the interpreter can run tl.dot on bfloat16 (after the workaround above)."""
    return BF16_DOT_OK
