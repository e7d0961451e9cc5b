"""Settings for every test run: torch computes on one thread, and the examples in bnfold's docstrings that
use an optional package are skipped, saying which, where it is not installed (as the tests that use one are).

One thread: the tests run many small models, where a second thread costs more than it gives (each op waits
for it to be scheduled, which on a busy machine takes milliseconds); the fuzzer in bench/fuzz.py does the same."""

from __future__ import annotations

import importlib.util

import pytest
import torch

torch.set_num_threads(1)

# docstring example (as pytest names it) -> the optional package it runs
EXAMPLES_NEEDING = {
    "bnfold.cli.zoo.build_named_model": "torchvision",
    "bnfold.cli.zoo.libraries_with": "torchvision",
    "bnfold.io.checkpoint.load_folded": "safetensors",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        package = EXAMPLES_NEEDING.get(item.name)
        if package is not None and importlib.util.find_spec(package) is None:
            item.add_marker(pytest.mark.skip(reason=f"this example needs {package}, which is not installed"))
