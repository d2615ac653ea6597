"""The package's import graph: no cycles, and the seams the architecture promises.

Read from the source with ast, so imports inside functions and behind
``if TYPE_CHECKING:`` count as well: a cycle hidden there is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mta"

# Outside mta/store/, these may name the SQLite backend: the lock that keeps one daemon
# per queue file (taken before the store is built) and `mta queue repair`, a SQLite file's
# own tool. Everything else reaches the store through mta.store.api and mta.store.factory.
SQLITE_BACKEND_USERS = {"mta.daemon.main_process", "mta.preflight", "mta.cli.queue"}

# None: `mta sendmail` is dispatched by mta/entry.py, so sendmail's -bp/-q may use mta.cli.
KNOWN_CYCLES: list[list[str]] = []


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every module of mta/ and the modules (in mta/ or not) it imports, anywhere in it."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.add(base)
                # `from mta.queue import courier` imports the module mta.queue.courier
                found.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = found
    return graph


def _internal(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {i for i in imported if i in graph and i != m} for m, imported in graph.items()}


def test_no_import_cycle_anywhere_in_mta() -> None:
    graph = _internal(_imports())
    # A package's __init__ importing its own modules is not a cycle of the design.
    graph = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep):], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == KNOWN_CYCLES


def test_queue_imports_neither_mailbox_nor_delivery() -> None:
    graph = _imports()
    wrong = {m: sorted(i for i in deps if i.startswith(("mta.mailbox", "mta.delivery")))
             for m, deps in graph.items() if m.startswith("mta.queue")}
    assert {m: deps for m, deps in wrong.items() if deps} == {}


def test_sqlite_stays_inside_the_store_package() -> None:
    graph = _imports()
    outside = {m: deps for m, deps in graph.items() if not m.startswith("mta.store")}
    drivers = {m: sorted(i for i in deps if i.split(".")[0] in ("sqlite3", "aiosqlite"))
               for m, deps in outside.items()}
    assert {m: d for m, d in drivers.items() if d} == {}
    backend = {m for m, deps in outside.items() if any(i.startswith("mta.store.sqlite") for i in deps)}
    assert backend <= SQLITE_BACKEND_USERS


def test_store_parts_use_the_engine_not_each_others_internals() -> None:
    """queue.py, admin.py and mailboxes.py build on the engine; only the queue reaches
    into mailboxes.py (to store local delivery's copies in its own commit)."""
    graph = _imports()
    parts = {"mta.store.sqlite.queue", "mta.store.sqlite.admin", "mta.store.sqlite.mailboxes"}
    for part in parts:
        siblings = {i for i in graph[part] if i in parts}
        assert siblings <= ({"mta.store.sqlite.mailboxes"} if part == "mta.store.sqlite.queue" else set()), part
    assert not any(i.startswith("mta.store.sqlite") for i in graph["mta.store.api"])
