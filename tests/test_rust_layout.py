"""The module graph of the Rust core (rust/core/src) has no cycles.

Nodes are file modules: each .rs file (`foo.rs` with a `foo/` folder beside it, or
`foo/mod.rs`, is one module `foo`; `lib.rs` is the crate root). An edge a -> b is a reference
from a's file to module b: `use crate::...`, a `crate::a::b` path in code, a `super::` path, a
`use` of a child module or of a name an earlier `use` brought in. A path resolves to the deepest
file module it names (`crate::formats::blocks::BlockQ4_0` -> `formats::blocks`). Edges between a
module and its own ancestors or descendants are left out: a parent is the facade of its
children. Everything else must form a DAG, so that shared items live below the modules that
share them (e.g. `formats::tensor`, `cpu`, `config`).

Plain text parsing, no ferroquant import: comments, strings and char literals are blanked
first, inline `mod name { ... }` blocks are tracked so that their `super::` resolves right.
"""

from __future__ import annotations

import re
from pathlib import Path

CORE_SRC = Path(__file__).resolve().parent.parent / "rust" / "core" / "src"

_TOKEN = re.compile(
    r"""//[^\n]*                       # line comment
      | /\*.*?\*/                      # block comment (ours do not nest)
      | b?r(\#*)".*?"\1                # raw string
      | b?"(?:\\.|[^"\\])*"            # string
      | b?'(?:\\.|[^'\\\n])'           # char literal (not a lifetime)
    """,
    re.S | re.X,
)


def _blank(text: str) -> str:
    """Comments, strings and char literals replaced by spaces (newlines kept, for line numbers)."""
    return _TOKEN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def module_of(path: Path, src: Path) -> tuple[str, ...]:
    """The module path of a source file (() for the crate root)."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts.pop()
    return tuple(parts)


def _expand_use(tree: str) -> list[tuple[list[str], str | None]]:
    """`a::{b, c::{d as e}}` -> [(['a','b'], None), (['a','c','d'], 'e')] (segments, alias)."""
    tree = re.sub(r"\s*(::|[{},*])\s*", r"\1", " ".join(tree.split()))
    out: list[tuple[list[str], str | None]] = []

    def walk(prefix: list[str], s: str) -> None:
        i = s.find("{")
        if i < 0:
            path, _, alias = s.partition(" as ")
            segs = prefix + [p for p in path.split("::") if p and p != "*"]
            if segs and segs[-1] == "self":
                segs.pop()
            out.append((segs, alias or None))
            return
        head = prefix + [p for p in s[:i].split("::") if p]
        depth, start = 0, i + 1
        for j in range(i + 1, len(s)):
            c = s[j]
            if c == "{":
                depth += 1
            elif c == "}" and depth:
                depth -= 1
            elif c in ",}" and depth == 0:
                if s[start:j]:
                    walk(head, s[start:j])
                start = j + 1
                if c == "}":
                    break

    walk([], tree.lstrip(":"))
    return out


class _File:
    """One file's references: (line, segments from the file module's point of view)."""

    def __init__(self, text: str):
        self.refs: list[tuple[int, int, list[str]]] = []  # (line, inline depth, segments)
        self.uses: list[tuple[int, int, list[str], str | None]] = []
        code = _blank(text)
        inline: list[tuple[str, int]] = []  # (name, brace depth at which it opened)
        depth = 0
        line = 1
        pending_mod: str | None = None
        token = re.compile(
            r"\n|\{|\}|;"
            r"|\bmod\s+(?P<mod>\w+)\s*(?=[{;])"
            r"|\buse\s+(?P<use>[^;]+);"
            r"|(?P<path>\b[A-Za-z_]\w*(?:\s*::\s*[A-Za-z_]\w*)+)"
        )
        for m in token.finditer(code):
            s = m.group(0)
            if s == "\n":
                line += 1
            elif s == "{":
                depth += 1
                if pending_mod is not None:
                    inline.append((pending_mod, depth))
                    pending_mod = None
            elif s == "}":
                if inline and inline[-1][1] == depth:
                    inline.pop()
                depth -= 1
            elif s == ";":
                pending_mod = None
            elif m.group("mod"):
                pending_mod = m.group("mod")
            elif m.group("use"):
                for segs, alias in _expand_use(m.group("use")):
                    self.uses.append((line, len(inline), segs, alias))
                line += s.count("\n")
            elif m.group("path"):
                segs = [p.strip() for p in m.group("path").split("::")]
                self.refs.append((line, len(inline), segs))
                line += s.count("\n")


def _resolve(
    here: tuple[str, ...], inline: int, segs: list[str], modules: set, aliases: dict
) -> tuple[str, ...] | None:
    """The deepest file module `segs` names, seen from `here` at inline-module depth `inline`."""
    first = segs[0]
    if first == "crate":
        base, rest = (), segs[1:]
    elif first in ("super", "self"):
        ups = 0
        while segs and segs[0] in ("super", "self"):
            ups += segs[0] == "super"
            segs = segs[1:]
        ups = max(0, ups - inline)  # supers that leave the inline modules of this file
        if ups > len(here):
            return None
        base, rest = here[: len(here) - ups], segs
    elif first in aliases:
        base, rest = aliases[first], segs[1:]
    elif here + (first,) in modules:
        base, rest = here, segs
    else:
        return None  # std, an external crate, a type, an enum variant
    target = base
    for s in rest:
        if target + (s,) in modules:
            target = target + (s,)
        else:
            break
    return target


def module_graph(src: Path) -> dict[tuple[str, ...], dict[tuple[str, ...], list[str]]]:
    """node -> {target: [evidence 'file:line']}, ancestor/descendant edges left out."""
    files = {module_of(p, src): p for p in sorted(src.rglob("*.rs"))}
    modules = set(files)
    graph: dict[tuple[str, ...], dict[tuple[str, ...], list[str]]] = {m: {} for m in modules}
    for here, path in files.items():
        parsed = _File(path.read_text())
        aliases: dict[str, tuple[str, ...]] = {}
        found: list[tuple[int, tuple[str, ...] | None]] = []
        for line, inline, segs, alias in parsed.uses:
            if not segs:
                continue
            target = _resolve(here, inline, segs, modules, aliases)
            found.append((line, target))
            # A name that is itself a module becomes a path root (`use super::x86;`).
            if target and segs[-1] == target[-1] and (alias or segs[-1]) != "_":
                aliases[alias or segs[-1]] = target
        for line, inline, segs in parsed.refs:
            found.append((line, _resolve(here, inline, segs, modules, aliases)))
        for line, target in found:
            if target is None:
                continue
            n = min(len(here), len(target))
            if here[:n] == target[:n]:
                continue  # itself, an ancestor or a descendant
            rel = path.relative_to(src)
            graph[here].setdefault(target, []).append(f"{rel}:{line}")
    return graph


def find_cycle(graph) -> list | None:
    """One cycle of the graph as [a, b, ..., a], or None for a DAG."""
    state: dict = {}
    stack: list = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _name(m: tuple[str, ...]) -> str:
    return "::".join(("crate",) + m)


def describe(graph, cycle) -> str:
    lines = []
    for a, b in zip(cycle, cycle[1:], strict=False):
        ev = graph[a][b]
        more = f" (+{len(ev) - 1} more)" if len(ev) > 1 else ""
        lines.append(f"  {_name(a)} -> {_name(b)}   at {ev[0]}{more}")
    return "module cycle:\n" + "\n".join(lines)


def test_core_modules_form_a_dag():
    graph = module_graph(CORE_SRC)
    assert len(graph) > 20, "parsed too few modules: wrong folder?"
    cycle = find_cycle(graph)
    if cycle:
        print(describe(graph, cycle))
    assert cycle is None, describe(graph, cycle)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_checker_finds_a_cycle(tmp_path):
    src = _tree(
        tmp_path,
        {
            "lib.rs": "pub mod a;\npub mod b;\npub mod c;\n",
            "a.rs": "use crate::b::Thing;\n",
            "b/mod.rs": "pub mod inner;\n",
            # inner -> c through an alias, c -> a through a path in code.
            "b/inner.rs": "use crate::c;\npub fn f() { c::g() }\n",
            "c.rs": (
                '// crate::b is only a comment here\npub fn g() { crate::a::h("crate::b") }\n'
            ),
        },
    )
    graph = module_graph(src)
    assert set(graph[("b", "inner")]) == {("c",)}
    assert set(graph[("c",)]) == {("a",)}
    assert set(graph[("a",)]) == {("b",)}
    assert find_cycle(graph) is None  # a -> b (the facade), b -> inner is a descendant edge
    (src / "b" / "mod.rs").write_text("pub mod inner;\npub use inner::f;\nuse crate::a;\n")
    graph = module_graph(src)
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert set(cycle) == {("a",), ("b",)}
    assert "crate::a -> crate::b" in describe(graph, cycle)


def test_checker_resolves_super_and_inline_modules(tmp_path):
    src = _tree(
        tmp_path,
        {
            "lib.rs": "pub mod x;\npub mod y;\n",
            "x/mod.rs": "pub mod p;\npub mod q;\n",
            # super:: in p is x (an ancestor); super::q is a sibling; inside the inline
            # module, super::super::q is the same sibling and `super::*` is p itself.
            "x/p.rs": (
                "use super::q;\n"
                "#[cfg(test)]\nmod tests {\n    use super::*;\n"
                "    fn t() { super::super::q::f(); let c = '{'; }\n}\n"
                "fn g() { super::super::y::h() }\n"
            ),
            "x/q.rs": "pub fn f() {}\n",
            "y.rs": "pub fn h() { crate::x::p::g2() }\n",
        },
    )
    graph = module_graph(src)
    assert set(graph[("x", "p")]) == {("x", "q"), ("y",)}
    assert set(graph[("y",)]) == {("x", "p")}
    assert find_cycle(graph) == [("x", "p"), ("y",), ("x", "p")]


if __name__ == "__main__":
    g = module_graph(CORE_SRC)
    c = find_cycle(g)
    print(describe(g, c) if c else "no cycle")
    for node in sorted(g):
        print(_name(node), "->", ", ".join(_name(t) for t in sorted(g[node])))
