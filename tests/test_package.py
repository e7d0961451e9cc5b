"""The package itself: its public names, imported on first use."""

from __future__ import annotations

import ast
import subprocess
import sys
import types
from pathlib import Path

import bnfold


def test_every_public_name_resolves():
    assert bnfold.__all__[-1] == "__version__"
    for name in bnfold.__all__:
        assert getattr(bnfold, name) is not None, name
    assert set(bnfold.__all__) <= set(dir(bnfold))


def test_importing_the_package_does_not_import_torch():
    code = "import sys, bnfold; print('torch' in sys.modules, bnfold.__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", bnfold.__version__]


def test_no_module_or_folder_shares_a_public_name():
    # importing such a module would replace the public function of that name on the package
    package = Path(bnfold.__file__).parent
    modules = {p.stem for p in package.glob("*.py")} | {p.name for p in package.iterdir() if p.is_dir()}
    assert not modules & set(bnfold.__all__)
    assert callable(bnfold.plan) and bnfold.plan.__module__ == "bnfold.api"
    assert isinstance(bnfold.testing, types.ModuleType)  # submodules are reachable as attributes


def test_the_folders_show_the_stages():
    package = Path(bnfold.__file__).parent
    stages = {p.name for p in package.iterdir() if (p / "__init__.py").exists()}
    assert stages == {"discover", "rules", "planning", "reparam", "apply", "check", "io", "cli"}
    assert len(list(package.glob("*.py"))) <= 10  # the public face only
    for path in package.rglob("*.py"):
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path} says nothing of its job"


def _imports(path: Path, module: str) -> set[str]:
    """Every bnfold module that ``module`` imports when it runs, at the top or inside a function."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    type_only = {  # imports under ``if TYPE_CHECKING:`` never run
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for statement in block.body
        for n in ast.walk(statement)
    }
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] != "bnfold":
                continue
            for alias in node.names:  # ``from . import x`` names a module
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in _MODULES else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "bnfold"}
    return {m for m in found if m in _MODULES and m != module}


_PACKAGE = Path(bnfold.__file__).parent
_MODULES = {
    ".".join(("bnfold", *p.relative_to(_PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
    for p in _PACKAGE.rglob("*.py")
}


def test_no_import_cycle_not_even_inside_functions():
    edges = {m: _imports(p, m) - {"bnfold"} for m, p in _MODULES.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: tuple[str, ...]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target] if target in path else [module, target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, (*path, target))
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, (module,))


def test_unknown_names_raise_attribute_error():
    try:
        bnfold.no_such_thing  # noqa: B018
    except AttributeError as error:
        assert str(error) == "module 'bnfold' has no attribute 'no_such_thing'"
    else:
        raise AssertionError("no AttributeError")
