"""Packaging: our import names cannot collide with another distribution's.

transformers (>= 5.25) depends on Hugging Face's kernel-hub package, a top-level ``kernels``; our
packages are ``encdec_cli``, ``encdec_models`` and ``encdec_kernels`` (docs/design.md, "Import names").
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OUR_PACKAGES = {"encdec_cli", "encdec_models", "encdec_kernels"}


def _run(args, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_no_bare_generic_package_in_the_repository():
    for name in ("kernels", "models"):
        shadow = REPO / name / "__init__.py"
        assert not shadow.exists(), f"a top-level '{name}' package shadows other distributions"
    assert {p.name for p in REPO.iterdir() if (p / "__init__.py").exists()} <= OUR_PACKAGES | {"tests"}


@pytest.mark.slow
def test_wheel_holds_only_our_top_level_packages(tmp_path):
    # Build from a copy: pip builds in the source tree, and a stale build/ would leak into the wheel.
    src = tmp_path / "src"
    skip = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".*cache", "*venv")
    shutil.copytree(REPO, src, ignore=skip)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)]
    r = _run(pip_wheel, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = tmp_path.glob("encdec-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        tops = {n.split("/", 1)[0] for n in zf.namelist() if "/" in n}
        tops = {t for t in tops if not t.endswith(".dist-info")}
        modules = {n for n in zf.namelist() if "/" not in n and n.endswith(".py")}
    assert tops == OUR_PACKAGES, tops
    assert not modules, modules


def test_from_repository_root_kernels_is_not_ours_and_transformers_imports():
    code = (
        "import importlib.util, pathlib, sys\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "origin = pathlib.Path(spec.origin).resolve() if spec and spec.origin else None\n"
        f"repo = pathlib.Path({str(REPO)!r})\n"
        "assert origin is None or 'site-packages' in origin.parts or repo not in origin.parents, origin\n"
        "from transformers import WhisperForConditionalGeneration, BartForConditionalGeneration, "
        "T5ForConditionalGeneration\n"
        "import encdec_kernels, encdec_models, encdec_cli\n"
        "assert not hasattr(encdec_kernels, '__version__')\n"
        "print('ok')\n"
    )
    r = _run([sys.executable, "-c", code], cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_console_script_runs_from_another_folder(tmp_path):
    script = Path(sys.executable).parent / "encdec"
    if not script.exists():
        script = shutil.which("encdec")
    if script is None:
        pytest.skip("the encdec console script is not installed in this environment")
    r = _run([str(script), "--help"], cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "transcribe" in r.stdout, r.stderr[-3000:]
    r = _run([str(script), "transcribe", "--help"], cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "--model" in r.stdout, r.stderr[-3000:]


def test_module_entry_point_runs_from_another_folder(tmp_path):
    r = _run([sys.executable, "-m", "encdec_cli", "--help"], cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "transcribe" in r.stdout, r.stderr[-3000:]


def test_benchmark_scripts_shadow_no_installed_module():
    """``python benchmarks/X.py`` puts benchmarks/ first on sys.path: a script named like an installed
    top-level module (``kernels.py`` once hid Hugging Face's ``kernels`` from transformers) breaks it."""
    import importlib.util

    for script in (REPO / "benchmarks").glob("*.py"):
        spec = importlib.util.find_spec(script.stem)
        origin = Path(spec.origin).resolve() if spec and spec.origin else None
        assert spec is None or origin == script.resolve(), f"benchmarks/{script.name} shadows {origin}"
