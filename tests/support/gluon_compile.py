"""Compile Gluon kernels for sm_90 on a machine without a GPU, in a fresh process (the test
process may have imported triton in interpreter mode, which Gluon's compiler cannot use)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
H100_SHARED_BYTES = 227 * 1024  # the most shared memory one CTA may take on sm_90


def compile_in_subprocess(script: str, cases: dict) -> dict:
    """Run ``script`` (reads the cases as JSON from argv[1], prints "RESULT <json>") without
    TRITON_INTERPRET, with the repository on the path; returns the printed dict."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-4000:] + proc.stderr[-8000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def ptxas_sm90(ptx: str) -> tuple[int, bool, str]:
    """Assemble ``ptx`` for sm_90a with Triton's bundled ptxas (``-v``), inside a compile script:
    (spill bytes, whether ptxas printed a spill report at all, its report)."""
    import triton.backends.nvidia.compiler as nv

    with tempfile.TemporaryDirectory() as tmp:
        pathlib.Path(tmp, "k.ptx").write_text(ptx)
        cmd = [nv.get_ptxas(90).path, "-arch=sm_90a", "-v", tmp + "/k.ptx", "-o", tmp + "/k.o"]
        info = subprocess.run(cmd, capture_output=True, text=True).stderr
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", info)]
    return sum(spills), bool(spills), info
