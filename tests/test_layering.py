"""The package's imports point down a declared layer order and form no cycle (docs/ARCHITECTURE.md draws it).

Every ``import`` and ``from ... import`` in the package's source (function-level ones included) is read with
``ast``, without importing anything. ``from pkg import name`` is an edge to the submodule ``pkg.name`` when that
is a module, else to ``pkg`` itself (its ``__init__``). The checker runs on small made-up packages first, so a
broken checker fails here rather than passing everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import from its own layer or any layer below it, never above.
LAYERS = (
    ("base", ("_version", "_C", "utils", "viz")),  # leaf helpers: versions, atomic files, locks, pictures
    ("kernels", ("kernels",)),  # Triton kernels (the top-level kernels/ folder, installed as pcrlv2_fast.kernels)
    ("reference", ("reference",)),  # plain-PyTorch references of the kernels and the official network
    ("nn", ("nn",)),  # building blocks: norm/act factories, LUConv, fused modules, kernel dispatch
    ("models", ("models", "checkpoint", "encoders")),  # the network, its checkpoints, encoder export
    ("losses", ("losses",)),
    ("data", ("data", "samples")),
    ("train", ("train", "finetune")),
    ("tools", ("selftest", "compile_report", "profiler", "transfer")),
    ("cli", ("cli", "__main__", "")),  # "": the package facade pcrlv2_fast/__init__.py
)


def layer_of(module: str, package: str) -> int:
    parts = module.split(".")
    assert parts[0] == package, module
    top = parts[1] if len(parts) > 1 else ""
    for rank, (_, tops) in enumerate(LAYERS):
        if top in tops:
            return rank
    raise AssertionError(f"{module}: not in any layer; add it to LAYERS in {Path(__file__).name}")


def package_modules(roots: dict[str, Path]) -> dict[str, Path]:
    """{dotted module name: file} for the package; ``roots`` maps a dotted prefix to its folder."""
    modules = {}
    for prefix, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = path
    return modules


def import_edges(modules: dict[str, Path], extra: tuple[str, ...] = ()) -> dict[str, set[str]]:
    """{module: the package modules it imports}; ``extra`` names modules without source (compiled extensions)."""
    known = set(modules) | set(extra)
    package = next(iter(modules)).split(".")[0]
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.add(sub if sub in known else source)
        edges[name] = {t for t in targets if t.split(".")[0] == package and t != name}
        unknown = edges[name] - known
        assert not unknown, f"{name} imports {sorted(unknown)}, which are not modules of {package}"
    return edges


def upward_imports(edges: dict[str, set[str]], package: str) -> list[str]:
    return sorted(f"{a} ({LAYERS[layer_of(a, package)][0]}) imports {b} ({LAYERS[layer_of(b, package)][0]})"
                  for a, targets in edges.items() for b in targets if layer_of(b, package) > layer_of(a, package))


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def project_edges() -> dict[str, set[str]]:
    modules = package_modules({"pcrlv2_fast": ROOT / "pcrlv2_fast", "pcrlv2_fast.kernels": ROOT / "kernels"})
    return import_edges(modules, extra=("pcrlv2_fast._C",))


def test_every_import_points_down_the_layers():
    edges = project_edges()
    assert len(edges) > 40  # the whole package was read
    assert upward_imports(edges, "pcrlv2_fast") == []


def test_no_import_cycles():
    assert find_cycle(project_edges()) is None


def test_the_kernels_folder_is_self_contained():
    # The kernels import Triton and each other only: no model, loss or reference code (references import them).
    edges = project_edges()
    outside = {a: sorted(b for b in targets if not b.startswith("pcrlv2_fast.kernels"))
               for a, targets in edges.items() if a.startswith("pcrlv2_fast.kernels")}
    assert {a: b for a, b in outside.items() if b} == {}


# ------------------------------------------------------------------------------------ the checker itself
def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "pcrlv2_fast" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pcrlv2_fast"


@pytest.mark.parametrize("files, problem", [
    ({"__init__.py": "", "nn/__init__.py": "from ..models import net\n", "models/__init__.py": "",
      "models/net.py": "X = 1\n"}, "upward"),
    ({"__init__.py": "", "data/__init__.py": "", "data/a.py": "def f():\n    from .b import g\n",
      "data/b.py": "from . import a\n"}, "cycle"),
    ({"__init__.py": "", "data/__init__.py": "from .a import f\n", "data/a.py": "from ..data import g\n"}, "cycle"),
    ({"__init__.py": "", "utils/__init__.py": "", "utils/io.py": "from pcrlv2_fast.nn import thing\n",
      "nn/__init__.py": ""}, "upward"),
    ({"__init__.py": "", "data/__init__.py": "from . import a\n", "data/a.py": "from ..nn import blocks\n",
      "nn/__init__.py": "", "nn/blocks.py": ""}, None),
])
def test_the_checker_finds_upward_imports_and_cycles(tmp_path, files, problem):
    folder = _write(tmp_path, files)
    edges = import_edges(package_modules({"pcrlv2_fast": folder}))
    assert bool(upward_imports(edges, "pcrlv2_fast")) == (problem == "upward")
    assert (find_cycle(edges) is not None) == (problem == "cycle")


def test_a_module_outside_the_layers_is_named(tmp_path):
    folder = _write(tmp_path, {"__init__.py": "", "gadgets.py": "from . import utils\n", "utils/__init__.py": ""})
    with pytest.raises(AssertionError, match="gadgets: not in any layer"):
        upward_imports(import_edges(package_modules({"pcrlv2_fast": folder})), "pcrlv2_fast")
