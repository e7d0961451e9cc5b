"""The package itself: its public names, imported on first use."""

from __future__ import annotations

import subprocess
import sys
import types

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


def test_a_submodule_named_like_a_public_function_does_not_hide_it():
    # what `import bnfold.plan` would do, were a module of that name imported
    bnfold.plan = types.ModuleType("bnfold.plan")  # type: ignore[assignment]
    assert callable(bnfold.plan) and bnfold.plan.__module__ == "bnfold.api"
    assert isinstance(bnfold.testing, types.ModuleType)  # submodules are reachable as attributes


def test_unknown_names_raise_attribute_error():
    try:
        bnfold.no_such_thing  # noqa: B018
    except AttributeError as error:
        assert str(error) == "module 'bnfold' has no attribute 'no_such_thing'"
    else:
        raise AssertionError("no AttributeError")
