"""The house's imports, read from the source with ``ast`` (nothing is imported): no import loop
between modules, and none that runs back up a floor. The floors, top to bottom: benchmarks ->
encdec_cli -> encdec_models -> encdec_kernels. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ("encdec_kernels", "encdec_models", "encdec_cli", "benchmarks")  # bottom to top


def _modules(package: str = "encdec_kernels") -> dict[str, Path]:
    """Dotted name -> file of every module of ``package`` (the package itself is its __init__)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(name: str, path: Path, modules=()) -> set[str]:
    """Every module ``name`` (the module at ``path``) imports, absolute, anywhere in it: for
    ``from pkg import x``, pkg.x if that is one of ``modules``, else pkg."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return found


def _graph(packages=("encdec_kernels",)) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports (edges among those modules only)."""
    modules = {k: v for package in packages for k, v in _modules(package).items()}
    return {
        name: (_imported(name, path, modules) & modules.keys()) - {name} for name, path in modules.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop as a path (first module repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [node, nxt]
            if nxt not in state and (found := visit(nxt, stack + [node])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_reads_every_kernel_module():
    graph = _graph()
    assert {"encdec_kernels", "encdec_kernels.common", "encdec_kernels.gluon_support"} <= graph.keys()
    # the Hopper kernels build on the shared modules (so a loop through them would show here)
    assert "encdec_kernels.common" in graph["encdec_kernels.flash_hopper"]
    assert "encdec_kernels.gluon_support" in graph["encdec_kernels.shared_kv_hopper"]


def test_kernel_modules_import_no_loop():
    graph = _graph()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_finder_finds_a_loop():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_house_imports_no_loop():
    graph = _graph(FLOORS[:3])
    assert {"encdec_cli.cli", "encdec_cli.engine.engine", "encdec_models.whisper"} <= graph.keys()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_import_runs_back_up_a_floor():
    bad = {}
    for floor, package in enumerate(FLOORS):
        for name, path in _modules(package).items():
            up = sorted(m for m in _imported(name, path) if m.split(".")[0] in FLOORS[floor + 1 :])
            if up:
                bad[name] = up
    assert not bad
    # the check sees real imports: the CLI imports the engine, the models import the kernels
    transcribe = ROOT / "encdec_cli" / "tasks" / "transcribe.py"
    assert "encdec_cli.engine" in _imported("encdec_cli.tasks.transcribe", transcribe)


def test_tasks_use_the_engine_through_its_public_face():
    """tasks/ (and the commands and io) import ``encdec_cli.engine``, never one of its modules."""
    inside = {
        name: sorted(m for m in _imported(name, path) if m.startswith("encdec_cli.engine."))
        for package in ("encdec_cli",)
        for name, path in _modules(package).items()
        if not name.startswith("encdec_cli.engine")
    }
    assert not {name: found for name, found in inside.items() if found}
