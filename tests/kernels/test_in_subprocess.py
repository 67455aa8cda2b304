"""Fallback runner: the interpreted kernel tests need a process whose first triton import saw
TRITON_INTERPRET=1 (see conftest.py). When this process cannot provide that (triton was
imported compiled before tests/kernels was collected, or a GPU is present), run this
directory's tests once in a fresh process with the variable set."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from tests.kernels.conftest import INTERPRETED

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.mark.skipif(INTERPRETED, reason="the kernel tests run in this process (interpreter active)")
def test_kernel_tests_in_fresh_interpreter_process():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU tensors only
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        # the offline-compile tests here run in this process (they compile in subprocesses of their own)
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--ignore-glob=*_compile.py"]
        + [str(HERE)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,  # about 15 minutes on a 2-core machine: the interpreter runs every program in turn
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
