"""The training tests' tiny random base and fast-run overrides, for benchmarks that train.

tests/training/conftest.py is loaded under its own module name (test directories are no
packages, and every conftest is a module `conftest`); its fixtures are re-exported here.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

_TRAINING_CONFTEST = Path(__file__).parents[1] / "training" / "conftest.py"
_spec = importlib.util.spec_from_file_location("training_conftest", _TRAINING_CONFTEST)
training = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(training)

tiny_base = training.tiny_base
single_thread = training.single_thread


@pytest.fixture(scope="session")
def tiny_spec():
    """The sizes of the training tests' tiny base."""
    return training.TEST_SPEC


@pytest.fixture(scope="session")
def tiny_sdxl_spec():
    """The sizes of the training tests' tiny SDXL base."""
    return training.TEST_SDXL_SPEC


@pytest.fixture(scope="session")
def fast_overrides(tiny_base) -> list[str]:
    """What the training tests pass to every run: the tiny base and a few steps of tiny batches."""
    return [f"model.path={tiny_base}", *training.FAST]


def _benchmark(name: str):
    """A fixture giving benchmarks/<name>.py as a module: pytest's `pythonpath` puts benchmarks/
    on the import path, as Python does for a script run from there."""

    @pytest.fixture(scope="module")
    def module() -> ModuleType:
        return importlib.import_module(name)

    return module


table2 = _benchmark("table2")
train_step = _benchmark("train_step")
edge_errors = _benchmark("edge_errors")
recompute = _benchmark("recompute")
