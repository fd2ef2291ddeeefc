"""The Python package's layout: no two modules import each other, directly or in a loop, and the
folders are the ones docs/architecture.md describes.

Nodes are the package's modules (each .py file; a package is its __init__.py). An edge a -> b is
any import of b in a's file, at the top or inside a function (a lazy import is still a
dependency): `from . import x` names the submodule x when there is one, else the package itself.
The graph must be a DAG. Plain `ast` parsing: nothing is imported."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "python" / "ferroquant"


def modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `package` (and every compiled
    extension, known by its .pyi stub: it imports nothing of ours)."""
    out = {}
    for path in sorted([*package.rglob("*.py"), *package.rglob("*.pyi")]):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(current: str, is_package: bool, level: int, module: str | None) -> str:
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports."""
    mods = modules(package)
    top = package.name
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        if path.suffix == ".pyi":
            continue
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                src = (
                    _resolve(name, is_package, node.level, node.module)
                    if node.level
                    else node.module or ""
                )
                for alias in node.names:
                    sub = f"{src}.{alias.name}"
                    targets.append(sub if sub in mods else src)
            for t in targets:
                if t != top and not t.startswith(top + "."):
                    continue
                while t not in mods and "." in t:  # `import a.b.c` of a name inside a module
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_package_imports_one_way():
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checker_finds_a_lazy_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n    return b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import c\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    graph = import_graph(pkg)
    assert graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.a"] == {"pkg.sub.b"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(pkg)) is None


# -- the folders docs/architecture.md names ---------------------------------------------------

_LISTED = re.compile(r"^`([\w./-]+/)`", re.M)


def _listed_folders() -> set[str]:
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    return set(_LISTED.findall(doc))


def _actual_folders() -> set[str]:
    """The repository's top-level folders, the package's folders, the Rust crates and the Rust
    core's first-level folders (deeper ones are a module's own business)."""
    skip = {"target", "__pycache__", "dist", "build", "bench_out", "ferroquant-eval"}

    def dirs(base: Path, pattern: str) -> set[str]:
        return {
            p.relative_to(ROOT).as_posix() + "/"
            for p in base.glob(pattern)
            if p.is_dir() and p.name not in skip and not p.name.startswith(".")
        }

    core = ROOT / "rust" / "core" / "src"
    return (
        dirs(ROOT, "*")
        | dirs(ROOT, "python/ferroquant")
        | dirs(PACKAGE, "**/*")
        | dirs(ROOT, "rust/*")
        | dirs(ROOT, "rust/*/src")
        | dirs(core, "*")
    )


@pytest.mark.parametrize("kind", ["missing from the doc", "listed but absent"])
def test_architecture_doc_matches_the_tree(kind):
    listed, actual = _listed_folders(), _actual_folders()
    if kind == "missing from the doc":
        assert not actual - listed, (
            f"folders docs/architecture.md does not describe: {actual - listed}"
        )
    else:
        assert not listed - actual, (
            f"docs/architecture.md names folders that do not exist: {listed - actual}"
        )
