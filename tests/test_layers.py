"""The package's layers: each module imports only what lies below it, so no two modules (or packages) import
each other, and generation/ never reaches up into the session, the server or the cluster. Read from the
source (every import, also those inside functions), so a lazy import cannot hide a circle."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "hermes_ort"
ABOVE_GENERATION = ("hermes_ort.session", "hermes_ort.generation_api", "hermes_ort.text_generator",
                    "hermes_ort.serve", "hermes_ort.cluster", "hermes_ort.commands", "hermes_ort.__main__")


def module_name(path: Path) -> str:
    parts = ("hermes_ort", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the hermes_ort modules it imports (a `from pkg import name` counts pkg.name when that is a
    module)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    found: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = found.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    if f"{source}.{alias.name}" in modules:
                        targets.add(f"{source}.{alias.name}")
                    elif source in modules:
                        targets.add(source)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name in modules)
        targets.discard(name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_two_modules_import_each_other():
    graph = imports()
    graph.pop("hermes_ort", None)  # the package's front re-exports everything below it
    assert cycles(graph) == []


def test_no_two_packages_import_each_other():
    graph: dict[str, set[str]] = {}
    for module, targets in imports().items():
        if module != "hermes_ort":
            graph.setdefault(package_of(module), set()).update(
                package_of(t) for t in targets if package_of(t) != package_of(module) and t != "hermes_ort")
    assert cycles(graph) == []


def test_generation_uses_only_what_lies_below_it():
    reaching_up = sorted((m, t) for m, targets in imports().items() if m.startswith("hermes_ort.generation.")
                         for t in targets if t.startswith(ABOVE_GENERATION))
    assert reaching_up == []


def test_the_checker_sees_a_circle_and_a_lazy_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "hermes_ort.format.manifest" in imports()["hermes_ort.format.warm"]
