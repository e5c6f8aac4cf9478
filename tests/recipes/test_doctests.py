"""The examples in the docstrings of recipes and hatplug.mixers run (`make test` runs --doctest-modules on hatplug
and fastervit; the recipes modules are listed here)."""

import doctest
import importlib

import pytest

MODULES = [
    "hatplug.mixers",
    "recipes.ablate",
    "recipes.callbacks",
    "recipes.cli",
    "recipes.data.base",
    "recipes.data.cifar",
    "recipes.data.folder",
    "recipes.data.synthetic",
    "recipes.measure",
    "recipes.models",
    "recipes.module",
    "recipes.report",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
