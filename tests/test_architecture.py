"""The house's walls: the import graph of selftok, vlm, rl and scripts has no cycle and follows the stated
direction (docs/contracts.md), and each helper that once existed in several copies is defined once."""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("selftok", "vlm", "rl", "scripts")
#: Helpers that used to be written several times (issue 16); each must now have exactly one definition.
DEFINED_ONCE = ("psnr", "resize_center_crop", "IMAGE_SUFFIXES", "write_atomic", "read_json", "sha256_file",
                "load_tokenizer", "make_accelerator", "save_grid", "category_means", "visible_mask", "Vocabulary",
                "scheduled_lr", "Progress", "EvalConfig", "RunConfig", "DemoConfig", "build_stages")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files() -> Iterator[Path]:
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def imports_of(path: Path) -> set[str]:
    """Every project module `path` imports, wherever the import statement stands (function bodies too)."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
            # `from pkg import sub` imports the module pkg.sub when there is one
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in targets if t.split(".")[0] in PACKAGES)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in project_files()}
    return {name: {t for t in imports_of(p) if t in modules and t != name} for name, p in modules.items()}


def test_no_import_cycles(graph):
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" → ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


#: (importer, imported, why it is against the direction)
FORBIDDEN = [
    ("selftok", "vlm", "imports flow selftok ← vlm ← rl"),
    ("selftok", "rl", "imports flow selftok ← vlm ← rl"),
    ("vlm", "rl", "imports flow selftok ← vlm ← rl"),
    ("selftok", "scripts", "the packages never import the scripts"),
    ("vlm", "scripts", "the packages never import the scripts"),
    ("rl", "scripts", "the packages never import the scripts"),
    ("selftok.model", "selftok.loaders", "the model knows no foreign format"),
    ("selftok.model", "selftok.training", "the model knows nothing of training"),
    ("selftok.model", "selftok.data", "the model knows nothing of data sources"),
    ("selftok.model", "selftok.shapes", "the model knows nothing of the shapes world"),
]
RECIPES = ("selftok.train", "selftok.pretokenize", "selftok.reconstruct")


def test_imports_follow_the_stated_direction(graph):
    wrong = []
    for importer, targets in graph.items():
        for target in targets:
            for a, b, why in FORBIDDEN:
                if _within(importer, a) and _within(target, b):
                    wrong.append(f"{importer} imports {target}: {why}")
            if _within(importer, "selftok") and target in RECIPES and not importer.startswith("scripts"):
                wrong.append(f"{importer} imports the recipe {target}: recipes are entry points, not library")
            if _within(importer, "selftok.runtime") and not _within(target, "selftok.runtime"):
                wrong.append(f"{importer} imports {target}: the runtime is the bottom layer")
            if _within(importer, "selftok.shapes") and not (_within(target, "selftok.shapes")
                                                             or _within(target, "selftok.runtime")):
                wrong.append(f"{importer} imports {target}: the shapes world is a leaf (runtime only)")
            if _within(target, "selftok.shapes") and target != "selftok.shapes" \
                    and not _within(importer, "selftok.shapes"):
                wrong.append(f"{importer} imports {target}: use the shapes world's API, `selftok.shapes`")
    assert not wrong, "\n".join(sorted(wrong))


def test_names_imported_from_the_shapes_world_are_its_api():
    import selftok.shapes as shapes
    bypass = []
    for path in project_files():
        if _within(module_name(path), "selftok.shapes"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "selftok.shapes":
                bypass += [f"{module_name(path)}: {a.name}" for a in node.names if a.name not in shapes.__all__]
    assert not bypass, "names outside selftok.shapes.__all__: " + ", ".join(bypass)


def test_each_formerly_duplicated_helper_is_defined_once():
    where: dict[str, list[str]] = {n: [] for n in DEFINED_ONCE}
    for path in project_files():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            else:
                continue
            for n in names:
                if n in where:
                    where[n].append(module_name(path))
    assert {n: w for n, w in where.items() if len(w) != 1} == {}
