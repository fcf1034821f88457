"""The package's public names stay what they are, whatever else was imported first."""

from __future__ import annotations

import importlib

import pytest

import lightning_mlflow_cv


@pytest.mark.parametrize("name", sorted(lightning_mlflow_cv._EXPORTS))
def test_a_public_name_is_not_shadowed_by_a_submodule(name):
    """Importing a submodule sets it as an attribute of the package, replacing what was there: a module named like
    a public function (``sync.py`` holding ``sync``) would turn ``from lightning_mlflow_cv import sync`` into the
    module as soon as anything (the console script) imported it. Import each name's module first, then look."""
    module = importlib.import_module(lightning_mlflow_cv._EXPORTS[name])
    assert getattr(lightning_mlflow_cv, name) is getattr(module, name)
