"""The training tests' tiny random base and fast-run overrides, for benchmarks that train.

tests/training/conftest.py is loaded under its own module name (test directories are no
packages, and every conftest is a module `conftest`); its fixtures are re-exported here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_TRAINING_CONFTEST = Path(__file__).parents[1] / "training" / "conftest.py"
_spec = importlib.util.spec_from_file_location("training_conftest", _TRAINING_CONFTEST)
training = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(training)

tiny_base = training.tiny_base
single_thread = training.single_thread


@pytest.fixture(scope="session")
def fast_overrides(tiny_base) -> list[str]:
    """What the training tests pass to every run: the tiny base and a few steps of tiny batches."""
    return [f"model.path={tiny_base}", *training.FAST]
