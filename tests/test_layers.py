"""The package's layers, as the README's Design diagram draws them: every module named there
exists, imports (at run time) only its own layer or below, and no imports go in a circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kickq_celery"

#: lowest first; a module may import its own layer and those before it
LAYERS = {
    "bottom": ["options", "keys", "records", "stats", "exceptions"],
    "core": ["plan", "scripts", "settings"],
    "io": ["connection", "store", "publisher", "tombstones", "cron", "waiters", "promise", "registry"],
    "worker": ["worker.heartbeat", "worker.loops", "worker.task", "worker.consumer", "worker.bootstep"],
    "client": ["client", "tasks"],
    "edges": ["cli", "prometheus", "testing", "harness", "embedded"],
}
RANK = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if not name.endswith("__init__"):
            found[name] = path
    return found


def runtime_imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken) of every relative import outside ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree)
                   if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for node in ast.walk(block)}
    package = name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level and id(node) not in typing_only:
            base = package[: len(package) - node.level + 1]
            target = ".".join([*base, node.module] if node.module else base)
            names = [alias.name for alias in node.names]
            if target in ("", "worker"):  # `from . import plan`: the names are modules
                found += [(".".join(filter(None, [target, n])), []) for n in names]
            else:
                found.append((target, names))
    return found


def test_every_module_has_a_layer_and_the_readme_names_them_all():
    assert set(modules()) == set(RANK)
    diagram = re.search(r"## Design\n.*?```\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert diagram, "the README has a Design diagram"
    named = set(re.findall(r"([a-z_]+)\.py", diagram.group(1)))
    assert {module.split(".")[-1] for module in RANK} <= named
    assert named <= {module.split(".")[-1] for module in RANK}


def test_modules_import_only_downward_and_take_no_private_names():
    wrong = []
    for name, path in modules().items():
        for target, names in runtime_imports(name, path):
            if target in RANK and RANK[target] > RANK[name]:
                wrong.append(f"{name} imports {target} (a higher layer)")
            wrong += [f"{name} takes private {n} from {target}" for n in names
                      if n.startswith("_") and not n.startswith("__")]
    assert not wrong


def test_no_import_circles():
    graph = {name: {t for t, _ in runtime_imports(name, path) if t in RANK}
             for name, path in modules().items()}
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        assert node not in stack, " -> ".join([*stack, node])
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, [*stack, node])
        done.add(node)

    for node in graph:
        visit(node, [])


def test_the_worker_side_never_imports_the_client():
    for name, path in modules().items():
        if name.startswith("worker."):
            assert "client" not in {t for t, _ in runtime_imports(name, path)}, name
