"""Packaging hazards."""


def test_transformers_does_not_take_our_kernels_package_for_hub_kernels():
    # transformers treats an importable top-level `kernels` with an accepted version as the Hub
    # `kernels` package; ours must never be mistaken for it (DESIGN.md, "Known hazard").
    from transformers.utils.import_utils import is_kernels_available

    import kernels

    assert not hasattr(kernels, "__version__")
    assert is_kernels_available() is False


def test_console_script_and_module_entry_points():
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "encdec_cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "transcribe" in r.stdout
