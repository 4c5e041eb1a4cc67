"""The house rules of docs/ARCHITECTURE.md, checked on the source: which rooms may import which, and no cycles.

Read from the files with `ast` (every import, at module level or inside a function; not those under
`if TYPE_CHECKING:`, which only name types), so the test sees the arrows a reader sees.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "dashboard", "fedlens", "simulations")


def _imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (dotted names)."""
    out: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found = set()
            for node in _nodes(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module)
                    found.update(f"{node.module}.{a.name}" for a in node.names)
            out[module] = {m for m in found if m.split(".")[0] in PACKAGES}
    return out


def _nodes(tree: ast.AST):
    """Every node, except what sits under `if TYPE_CHECKING:` (names for annotations, never imported at run time)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        yield node
        yield from _nodes(node)


def _top(name: str) -> str:
    return name.split(".")[0]


def test_client_and_server_never_import_each_other():
    # Prepare
    imports = _imports()
    # Execute
    crossing = sorted((m, i) for m, found in imports.items() for i in found
                      if (_top(m), _top(i)) in {("client", "server"), ("server", "client")})
    # Assert
    assert crossing == []


def test_common_imports_only_common():
    imports = _imports()
    assert sorted((m, i) for m, found in imports.items() if _top(m) == "common"
                  for i in found if _top(i) != "common") == []


def test_the_findings_engine_never_reads_the_store():
    imports = _imports()
    assert sorted((m, i) for m, found in imports.items() if m.startswith("server.findings")
                  for i in found if i.startswith("common.run_store")) == []


def test_there_is_no_import_cycle_between_modules():
    # Prepare: module-level edges only between modules that exist (a `from x import name` may name a function).
    imports = _imports()
    graph = {m: {i for i in found if i in imports and i != m} for m, found in imports.items()}
    # Execute: depth-first search for a back edge.
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # Assert
    assert cycles == []
