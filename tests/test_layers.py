"""The package's shape: imports run one way, `click` stays in the command line, modules are small.

Every module of `icdcli` is read with `ast` (nothing is imported), `icdcli.training`, `icdcli.export` and
`icdcli.engines` from their folders at the root. An import counts wherever it is written, at module level or inside a
function: `import a.b`, `from a import b` (the submodule `a.b` when there is one, else `a`), relative imports, and
`importlib.import_module("a.b")` with a literal name. Imports under `if TYPE_CHECKING:` do not count: they never run.

Layers, lowest first, as the code imports them. A module may import modules of its own layer and of lower layers,
never of a higher one; the packages of one layer may import each other.

0. `core`: leaf modules (errors, value and text checks, digests, dtypes, paths, the version).
1. `io`: images and atomic writes.
2. `diffusion`: the method (noise schedule, samplers, the denoiser seam, recipes, Prompt-to-Prompt).
3. `models`: the model API and metadata, the runtime model and its PyTorch execution, loading, LoRA fusion, identity.
4. `editing`, `training`: what runs networks: edits on a loaded model; the distillation of the embedded model
   (which imports `diffusion` and `io`, never `models`, today).
5. `backends`, `export`, `engines`: a loaded model on ONNX Runtime or TensorRT, its export, the engines that run it.
6. `run`: the batch runner of `icd edit`, its inputs, planning and outputs.
7. the front ends: `cli`, `serve` (the web front end beside the command line), `bench`, `pie`, and the package's face
   (`icdcli/__init__.py`, `__main__.py`, `pipeline.py`).

Besides: `click` is imported in `icdcli/cli/` alone; no module sits directly in `icdcli/` but the face; no file in
`icdcli/`, `export/` or `engines/` is over 600 lines, no class there over 250.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"icdcli": ROOT / "icdcli", "icdcli.training": ROOT / "training", "icdcli.export": ROOT / "export",
            "icdcli.engines": ROOT / "engines"}  # fmt: skip
FACE = "face"
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"core"}),
    frozenset({"io"}),
    frozenset({"diffusion"}),
    frozenset({"models"}),
    frozenset({"editing", "training"}),
    frozenset({"backends", "export", "engines"}),
    frozenset({"run"}),
    frozenset({"cli", "serve", "bench", "pie", FACE}),
)
FACE_MODULES = {"icdcli", "icdcli.__main__", "icdcli.pipeline"}
CLICK_HOME = "icdcli.cli"
MAX_FILE_LINES = 600
MAX_CLASS_LINES = 250
SIZED_FOLDERS = (ROOT / "icdcli", ROOT / "export", ROOT / "engines")


def module_files() -> dict[str, Path]:
    """Every module by its dotted name (a package by its own name, read from its `__init__.py`)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [part for part in path.relative_to(folder).with_suffix("").parts if part != "__init__"]
            found[".".join([package, *parts])] = path
    return found


MODULES = module_files()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _run_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node that can run: the bodies of `if TYPE_CHECKING:` left out (their `else` kept)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def _from_base(name: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` reads from."""
    if not node.level:
        return node.module or ""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def _known(name: str) -> str | None:
    """`name`, or the nearest enclosing module of it that is one of ours (None: not ours)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in MODULES else None


def _imported_names(name: str, path: Path, node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = _from_base(name, path, node)
        return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if called == "import_module" and isinstance(node.args[0].value, str):
            return [node.args[0].value]
    return []


def imports_of(name: str, path: Path) -> set[str]:
    """Our modules that module `name` imports when it runs (itself left out)."""
    found = set()
    for node in _run_nodes(ast.parse(path.read_text(), str(path))):
        for imported in _imported_names(name, path, node):
            module = _known(imported)
            if module is not None and module != name:
                found.add(module)
    return found


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that reach each other (Tarjan), only those of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(start: str) -> None:  # iterative: a deep import chain must not hit the recursion limit
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return groups


def a_cycle(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """One cycle through the first module of `group` (breadth first: a shortest one), closed on its start."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    return [*paths[node], start]
                if child not in paths:
                    paths[child] = [*paths[node], child]
                    following.append(child)
        frontier = following
    raise AssertionError(f"{group} is not strongly connected")


def group_of(name: str) -> str:
    """The package a module belongs to in `LAYERS` (the face's modules are the face)."""
    if name in FACE_MODULES:
        return FACE
    return name.split(".")[1]


def rank(group: str) -> int | None:
    return next((position for position, layer in enumerate(LAYERS) if group in layer), None)


def test_the_walk_sees_every_kind_of_import():
    tree = ast.parse(
        "import icdcli.core.paths\nfrom icdcli.diffusion import recipe\nfrom ..io.images import fit_size\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from icdcli.run import runner\nelse:\n"
        "    import icdcli.core.texts\ndef late():\n    from icdcli.models.api import EditModel\n"
        "    return importlib.import_module('icdcli.core.errors')\n"
    )
    path = ROOT / "icdcli" / "editing" / "stages.py"
    found = {
        module
        for node in _run_nodes(tree)
        for name in _imported_names("icdcli.editing.stages", path, node)
        if (module := _known(name)) is not None
    }
    assert found == {"icdcli.core.paths", "icdcli.diffusion.recipe", "icdcli.io.images", "icdcli.core.texts",
                     "icdcli.models.api", "icdcli.core.errors"}  # fmt: skip
    assert {"icdcli.editing.stages", "icdcli.export.manifest", "icdcli.training", "icdcli"} <= set(MODULES)


def test_no_import_cycle():
    cycles = [" -> ".join(a_cycle(GRAPH, group)) for group in strongly_connected(GRAPH)]
    assert not cycles, "import cycles (module-level and function-level imports):\n" + "\n".join(cycles)


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert a_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def test_every_package_has_a_layer():
    groups = {group_of(name) for name in MODULES}
    placed = set().union(*LAYERS)
    assert groups <= placed, f"packages without a layer in LAYERS: {sorted(groups - placed)}"


def _above(imported: str, name: str) -> bool:
    """Whether `imported` is in a higher layer than `name` (a package without a layer is the test above's)."""
    own, other = rank(group_of(name)), rank(group_of(imported))
    return own is not None and other is not None and other > own


def test_no_module_imports_a_higher_layer():
    upward = sorted(
        f"{name} ({group_of(name)}) imports {imported} ({group_of(imported)})"
        for name, imported_modules in GRAPH.items()
        for imported in imported_modules
        if _above(imported, name)
    )
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def _imports_click(path: Path) -> bool:
    for node in _run_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import) and any(alias.name.split(".")[0] == "click" for alias in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "click":
            return True
    return False


def test_click_is_imported_by_the_command_line_alone():
    allowed = {name for name in MODULES if name == CLICK_HOME or name.startswith(CLICK_HOME + ".")}
    outside = sorted(name for name, path in MODULES.items() if name not in allowed
                     and _imports_click(path))  # fmt: skip
    assert not outside, f"click imported outside {CLICK_HOME}: {outside}"


def test_only_the_face_sits_directly_in_icdcli():
    top = {"icdcli" if path.stem == "__init__" else f"icdcli.{path.stem}" for path in (ROOT / "icdcli").glob("*.py")}
    outside = sorted(top - FACE_MODULES)
    assert not outside, f"modules directly in icdcli/ outside the face and the sub-packages: {outside}"


def _sized_files() -> list[Path]:
    return [path for folder in SIZED_FOLDERS for path in sorted(folder.rglob("*.py"))]


def test_no_file_is_over_600_lines():
    long = [(str(path.relative_to(ROOT)), lines) for path in _sized_files()
            if (lines := len(path.read_text().splitlines())) > MAX_FILE_LINES]  # fmt: skip
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_class_is_over_250_lines():
    long = [
        (f"{path.relative_to(ROOT)}:{node.name}", node.end_lineno - node.lineno + 1)
        for path in _sized_files()
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.ClassDef) and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES
    ]  # fmt: skip
    assert not long, f"classes over {MAX_CLASS_LINES} lines: {long}"
