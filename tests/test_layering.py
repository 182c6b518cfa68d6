"""The package's import graph, read from the source with `ast`: no cycle, no import running back up the layers.

Every `import` counts, at module level or inside a function (a function-level import is still an arrow:
it only runs later). Layers, lowest first; a module may import its own layer and the layers below it:

| rank | layer | modules |
|---|---|---|
| 0 | kernels | `selfrag_engine.kernels` (the top-level `kernels/` folder): imports nothing else of the package |
| 1 | base | `errors`, `config`, `vocab`, `backend`, `tokenizer`, `detokenizer`, `hub` (model names), and `_C` (the C++ extension built from `csrc/`) |
| 2 | layers | `layers/`: attention with its metadata and KV cache view, sampler, penalties, FP8 linear |
| 3 | models | `models/` |
| 4 | weights | `weights/` (checkpoint reading, loading, quantization); `testing` (writes checkpoints) |
| 5 | engine | `engine/` (`structured_output`: grammars and token masks over xgrammar, imported on first use) |
| 6 | retrieval | `retrieval/` |
| 7 | selfrag | `selfrag/` |
| 8 | tiny | `tiny/` |
| 9 | entrypoints | `entrypoints/`, the package facade `selfrag_engine/__init__.py`, `__main__`, `cmake_dir` |
|   |             | (the server's guards among them: `server_limits`, `body_guard`, `openai_errors`, `prompt_prep`, `finite`, `admission`, `access`, `slow_clients`, `openapi_schema`, `serve_options`) |

The facade resolves its exports lazily (by name, through importlib), which is why importing a kernel does not
load the engine; its ast-visible imports are only importlib's.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "selfrag_engine"
KERNELS = f"{PACKAGE}.kernels"
# Compiled modules of the package: imported, never importing anything of it.
EXTENSIONS = frozenset({f"{PACKAGE}._C"})

LAYERS: tuple[tuple[str, ...], ...] = (
    ("kernels",),
    ("errors", "config", "vocab", "backend", "tokenizer", "detokenizer", "hub", "_C"),
    ("layers",),
    ("models",),
    ("weights", "testing"),
    ("engine",),
    ("retrieval",),
    ("selfrag",),
    ("tiny",),
    ("entrypoints", "__main__", "cmake_dir", ""),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def package_sources(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every module of the package and of `kernels/` (installed as its subpackage)."""
    sources: dict[str, Path] = {}
    for base, prefix in ((root / PACKAGE, PACKAGE), (root / "kernels", KERNELS)):
        for file in sorted(base.rglob("*.py")):
            parts = list(file.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            sources[".".join([prefix, *parts])] = file
    return sources


def _is_package(name: str, sources: dict[str, Path]) -> bool:
    return sources[name].name == "__init__.py"


def _target(name: str, sources: dict[str, Path]) -> str | None:
    """The package module an imported dotted name lands in: the longest prefix that is one of ours."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in sources or candidate in EXTENSIONS:
            return candidate
    return None


def imports_of(module: str, sources: dict[str, Path]) -> dict[str, list[tuple[int, bool]]]:
    """Package modules `module` imports -> [(line, inside a function or class)], relative imports resolved."""
    tree = ast.parse(sources[module].read_text(encoding="utf-8"), filename=str(sources[module]))
    found: dict[str, list[tuple[int, bool]]] = {}
    package = module if _is_package(module, sources) else module.rpartition(".")[0]

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[:len(package.split(".")) - child.level + 1]
                    origin = ".".join(base + ([child.module] if child.module else []))
                else:
                    origin = child.module or ""
                # `from pkg import sub` imports the submodule when there is one, else a name of pkg.
                names = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in sources else origin for a in child.names]
            for name in names:
                target = _target(name, sources)
                if target is not None and target != module:
                    found.setdefault(target, []).append((child.lineno, nested))
            visit(child, inner)

    visit(tree, False)
    return found


def import_graph(sources: dict[str, Path]) -> dict[str, dict[str, list[tuple[int, bool]]]]:
    return {m: imports_of(m, sources) for m in sources}


def rank_of(module: str) -> int:
    rest = module.removeprefix(PACKAGE).removeprefix(".")
    head = rest.split(".")[0]
    if head not in RANK:
        raise KeyError(f"{module} has no layer: add it to LAYERS")
    return RANK[head]


def upward_imports(graph: dict[str, dict[str, list[tuple[int, bool]]]]) -> list[str]:
    """Every import of a module by one in a lower layer, as 'importer:line -> imported (ranks)'."""
    out = []
    for src, targets in graph.items():
        for dst, sites in targets.items():
            if rank_of(dst) > rank_of(src):
                for line, _ in sites:
                    out.append(f"{src}:{line} -> {dst} ({rank_of(src)} < {rank_of(dst)})")
    return sorted(out)


def find_cycle(graph: dict[str, dict[str, list[tuple[int, bool]]]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle is not None:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = dfs(start)
            if cycle is not None:
                return cycle
    return None


@pytest.fixture(scope="module")
def sources() -> dict[str, Path]:
    return package_sources()


@pytest.fixture(scope="module")
def graph(sources):
    return import_graph(sources)


def test_every_module_has_a_layer(sources):
    assert {f"{PACKAGE}.engine.llm_engine", f"{KERNELS}.sampling", f"{PACKAGE}.entrypoints.cli"} <= set(sources)
    unplaced = []
    for module in sources:
        try:
            rank_of(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced


def test_no_import_cycle(graph):
    assert find_cycle(graph) is None


def test_no_import_runs_back_up_the_layers(graph):
    assert upward_imports(graph) == []


def test_kernels_import_nothing_of_the_package_but_kernels(graph):
    outside = {f"{src} -> {dst}" for src, targets in graph.items() if src.startswith(KERNELS)
               for dst in targets if not (dst == KERNELS or dst.startswith(KERNELS + "."))}
    assert outside == set()


def test_kernels_is_a_folder_installed_by_package_dir_not_a_symlink():
    link = ROOT / PACKAGE / "kernels"
    assert not link.is_symlink() and not link.exists()
    assert (ROOT / "kernels" / "__init__.py").is_file()


# ---- the checks catch what they are meant to catch ------------------------------------------------------


def _with_module(sources: dict[str, Path], tmp_path: Path, name: str, code: str) -> dict[str, Path]:
    file = tmp_path / (name.replace(".", "_") + ".py")
    file.write_text(code, encoding="utf-8")
    return {**sources, name: file}


def test_an_injected_upward_import_is_reported(sources, tmp_path):
    injected = _with_module(sources, tmp_path, f"{PACKAGE}.layers.injected",
                            "def f():\n    from selfrag_engine.selfrag.short_form import SelfRAG\n    return SelfRAG\n")
    graph = import_graph(injected)
    assert graph[f"{PACKAGE}.layers.injected"] == {f"{PACKAGE}.selfrag.short_form": [(2, True)]}
    assert upward_imports(graph) == [f"{PACKAGE}.layers.injected:2 -> {PACKAGE}.selfrag.short_form (2 < 7)"]


def test_an_injected_kernel_import_of_the_engine_is_reported(sources, tmp_path):
    injected = _with_module(sources, tmp_path, f"{KERNELS}.injected", "from selfrag_engine import backend\n")
    graph = import_graph(injected)
    assert graph[f"{KERNELS}.injected"] == {f"{PACKAGE}.backend": [(1, False)]}
    assert upward_imports(graph) == [f"{KERNELS}.injected:1 -> {PACKAGE}.backend (0 < 1)"]


def test_an_injected_cycle_is_found(sources, tmp_path):
    a, b = f"{PACKAGE}.engine.injected_a", f"{PACKAGE}.engine.injected_b"
    injected = _with_module(sources, tmp_path, a, "from . import injected_b\n")
    injected = _with_module(injected, tmp_path, b, "def g():\n    import selfrag_engine.engine.injected_a\n")
    cycle = find_cycle(import_graph(injected))
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {a, b}
    assert upward_imports(import_graph(injected)) == []
