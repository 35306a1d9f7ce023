"""The package's import graph: no cycle, and no arrow from a lower layer to a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "cvfp_lightning"

# lowest first; a module may import its own layer and the ones below
LAYERS = [
    ("foundation", ("errors", "io", "runtime", "progress")),
    ("models, maths and data", ("models", "solvers", "losses", "metrics", "optim", "schedulers", "diagnostics", "data",
                                "sequential_pass", "generation", "hub", "context_store")),
    ("the context cache", ("context_cache",)),
    ("LightningModules", ("modules",)),
    ("callbacks", ("callbacks",)),
    ("runs and experiments", ("lightning_cli", "runs", "experiments", "export", "evaluate", "generate")),
    ("the entry point", ("cli", "__main__")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every cvfp_lightning module ``path`` imports, at module level or inside functions (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        found |= {n[len("cvfp_lightning."):] for n in names if n.startswith("cvfp_lightning.")}
    return found


def layer(module: str) -> int:
    top = module.split(".")[0]
    for k, (_, tops) in enumerate(LAYERS):
        if top in tops:
            return k
    raise AssertionError(f"cvfp_lightning.{module} is in no layer: add it to LAYERS")


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PKG.rglob("*.py") if module_name(p)}


def test_no_arrow_runs_up_a_layer():
    upward = [f"{m} ({LAYERS[layer(m)][0]}) imports {d} ({LAYERS[layer(d)][0]})"
              for m, deps in graph().items() for d in deps if layer(d) > layer(m)]
    assert upward == []


def test_the_import_graph_has_no_cycle():
    g = graph()
    modules = set(g)

    def resolve(dep: str) -> str:  # "models.context" is a module; "callbacks" a package __init__
        return dep if dep in modules else dep.rsplit(".", 1)[0]

    edges = {m: {resolve(d) for d in deps if resolve(d) != m} for m, deps in g.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1 and not (m.startswith(d + ".")):  # a package importing its own submodules is fine
                cycles.append(" -> ".join(path[path.index(d):] + [d]) if d in path else f"{m} -> {d}")
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cycles == []
