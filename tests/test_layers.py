"""The house's import graph, read from the source (every import statement, wherever it stands): each module sits
in one layer, imports only its own layer or those below, no circle of modules forms, and no project import hides
inside a function. The layers, bottom-up (README's "Layout", DESIGN's layers):

  leaves   pixels, text, backbones, metrics, schedules, the command helpers and the config
  models   the base VLM and its machinery, the connector kinds, the foveated model, the registry of kinds
  data     readers of each layout and each model's processor (labels are built here)
  runs     training, evaluation, the commands
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("leaves", "models", "data", "runs")

# module (or package prefix ending in ".") -> layer; the first matching entry wins, so exact names come first
PLACES: dict[str, str] = {
    **dict.fromkeys(["vlm", "inputs", "layouts", "evals", "training"], "leaves"),  # packages: a docstring only
    "cli": "leaves",
    "config": "leaves",
    "inputs.frames": "leaves",
    "inputs.tokenization": "leaves",
    "vlm.weights": "leaves",
    "vlm.casts": "leaves",
    "vlm.beam": "leaves",
    "vlm.kvcache": "leaves",
    "vlm.layout": "leaves",
    "evals.metrics": "leaves",
    "evals.caption_metrics": "leaves",
    "evals.timing": "leaves",
    "evals.results": "leaves",
    "training.schedule": "leaves",
    "vlm.": "models",
    "connectors": "models",
    "connectors.": "models",
    "encoder": "models",
    "model": "models",
    "release": "models",
    "registry": "models",
    "inputs.processors": "data",
    "collate": "data",
    "data": "data",
    "layouts.": "data",
    "evals.": "runs",
    "training.": "runs",
    **dict.fromkeys(["train", "benchmark", "chat", "app", "prepare", "compare", "toyworld", "bench"], "runs"),
}
KIND_MODULES = {"model", "connectors.smolvlm", "connectors.tower_vlm"}  # concrete model classes
KNOW_EVERY_KIND = {"registry", "train", "benchmark", "chat", "app", "prepare", "compare", "toyworld", "bench"}


def modules(root: Path = REPO) -> dict[str, Path]:
    """Every project module by dotted name (tests, and the examples a user copies, excluded)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("tests", "runs", "data", "examples") or any(p.startswith(".") for p in rel.parts):
            continue
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def place(module: str) -> str | None:
    for key, layer in PLACES.items():
        if module == key or (key.endswith(".") and module.startswith(key)):
            return layer
    return None


def imports(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import statement of the file. `from pkg import
    name` names the module pkg.name when that is a module, else pkg."""
    tree = ast.parse(path.read_text(), str(path))
    inner: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            inner.update(id(n) for n in ast.walk(node) if n is not node)
    out = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names]
            targets = [name if name in known else node.module for name in names]
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a module a.b.c or of a name in it
                target = target.rpartition(".")[0]
            if target:
                out.append((target, node.lineno, id(node) in inner))
    return out


def graph(root: Path = REPO) -> tuple[dict[str, Path], dict[str, list[tuple[str, int, bool]]]]:
    mods = modules(root)
    return mods, {name: imports(path, set(mods)) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def problems(root: Path = REPO) -> list[str]:
    """Everything wrong with the house's imports, one line each (empty: the layers hold)."""
    mods, found = graph(root)
    out = [f"{name}: no layer (add it to tests/test_layers.py PLACES)" for name in mods if place(name) is None]
    edges = {name: {t for t, _, _ in targets if t != name} for name, targets in found.items()}
    for name, targets in found.items():
        here = place(name)
        for target, line, inner in targets:
            there = place(target)
            if here and there and LAYERS.index(there) > LAYERS.index(here):
                out.append(f"{mods[name].relative_to(root)}:{line}: {name} ({here}) imports {target} ({there}): upward")
            if inner and target != name:
                out.append(f"{mods[name].relative_to(root)}:{line}: {name} imports {target} inside a function")
            if target in KIND_MODULES and name not in KNOW_EVERY_KIND | KIND_MODULES:
                out.append(f"{mods[name].relative_to(root)}:{line}: {name} imports the concrete kind {target}")
    out += [f"import circle: {' -> '.join(c)}" for c in cycles(edges)]
    return out


def test_the_layers_hold():
    assert problems() == []


def test_every_package_says_what_it_holds():
    for package in ("vlm", "connectors", "inputs", "layouts", "evals", "training"):
        init = REPO / package / "__init__.py"
        assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), package


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"config.py": "import model\n", "model.py": ""}, "config (leaves) imports model (models): upward"),
        ({"vlm/base.py": "from vlm import saved\n", "vlm/saved.py": "from vlm.base import VLM\n"}, "import circle"),
        ({"train.py": "def f():\n    import registry\n", "registry.py": ""}, "imports registry inside a function"),
        ({"layouts/toy.py": "import model\n", "model.py": ""}, "layouts.toy imports the concrete kind model"),
        ({"inputs/processors.py": "import toyworld\n", "toyworld.py": ""}, "upward"),
        ({"newthing.py": ""}, "newthing: no layer"),
    ],
)
def test_the_check_finds_what_breaks_the_layers(tmp_path, files, expected):
    """The checker itself on small trees: an upward arrow, a circle, an import hidden in a function, a module that
    knows a concrete kind, a module with no layer are each found."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert any(expected in line for line in problems(tmp_path)), problems(tmp_path)
