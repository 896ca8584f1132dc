"""The training tests' tiny random base and fast-run overrides, for benchmarks that train.

tests/training/conftest.py is loaded under its own module name (test directories are no
packages, and every conftest is a module `conftest`); its fixtures are re-exported here.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
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
def fast_overrides(tiny_base) -> list[str]:
    """What the training tests pass to every run: the tiny base and a few steps of tiny batches."""
    return [f"model.path={tiny_base}", *training.FAST]


def _benchmark_script(name: str) -> Iterator[ModuleType]:
    """benchmarks/<name>.py as a module (benchmarks/ is no package), registered in sys.modules
    while in use so that its dataclasses resolve, with benchmarks/ on the import path as when the
    script runs (one script may import another)."""
    folder = Path(__file__).parents[2] / "benchmarks"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(folder))
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(folder))
        del sys.modules[spec.name]


@pytest.fixture(scope="module")
def table2() -> Iterator[ModuleType]:
    yield from _benchmark_script("table2")


@pytest.fixture(scope="module")
def train_step() -> Iterator[ModuleType]:
    yield from _benchmark_script("train_step")


@pytest.fixture(scope="module")
def edge_errors() -> Iterator[ModuleType]:
    yield from _benchmark_script("edge_errors")


@pytest.fixture(scope="module")
def recompute() -> Iterator[ModuleType]:
    yield from _benchmark_script("recompute")
