"""The dependency direction of DESIGN.md, read from the source with `ast` (imports inside
functions included): leaves <- passes, runtime (never each other) <- api / cli / train / export."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fracfx": ROOT / "fracfx", "fracfx.passes": ROOT / "passes", "fracfx.runtime": ROOT / "runtime"}
MAX_LINES = 400
MAX_TOP_LEVEL_MODULES = 12


def _product_files():
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            yield package, folder, path


def _module_name(package: str, folder: Path, path: Path) -> str:
    parts = list(path.relative_to(folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _imports(package: str, folder: Path, path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved), anywhere in it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(package, folder, path)
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    folder = PACKAGES[package]
    bad = []
    for _, _, path in (f for f in _product_files() if f[0] == package):
        for name in sorted(_imports(package, folder, path)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


def test_runtime_imports_only_leaves():
    forbidden = ("fracfx.api", "fracfx.passes", "fracfx.train", "fracfx.cli", "fracfx.export", "fracfx.data")
    assert _violations("fracfx.runtime", forbidden) == []


def test_passes_never_import_the_runtime_or_the_layers_above():
    forbidden = ("fracfx.runtime", "fracfx.api", "fracfx.train", "fracfx.cli")
    assert _violations("fracfx.passes", forbidden) == []


@pytest.mark.parametrize("leaf", ["fracfx/cost_model.py", "fracfx/nn/precision.py", "fracfx/meta.py", "fracfx/config.py", "fracfx/errors.py"])
def test_leaves_import_no_layer_above_them(leaf):
    path = ROOT / leaf
    forbidden = ("fracfx.api", "fracfx.passes", "fracfx.runtime", "fracfx.train", "fracfx.cli", "fracfx.export")
    names = _imports("fracfx", ROOT / "fracfx", path)
    assert [n for n in sorted(names) if any(n == f or n.startswith(f + ".") for f in forbidden)] == []


def test_the_checker_sees_imports_inside_functions():
    source = ROOT / "tests" / "_layering_probe.py"
    source.write_text("def f():\n    from fracfx.api import transform\n    import fracfx.passes.infra\n")
    try:
        names = _imports("fracfx", ROOT / "tests", source)
    finally:
        source.unlink()
    assert {"fracfx.api", "fracfx.api.transform", "fracfx.passes.infra"} <= names


def test_no_product_file_is_over_the_line_limit():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for _, _, p in _product_files()}
    assert {path: n for path, n in lengths.items() if n > MAX_LINES} == {}


def test_fracfx_top_level_stays_small():
    modules = sorted(p.name for p in (ROOT / "fracfx").glob("*.py"))
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, modules
