"""benchmarks/measure.py, the module every benchmark measures with."""

from __future__ import annotations

import measure
import torch


def test_measuring_helpers():
    """The shared module: rotating order, timing with warm-up, tables, the machine."""
    assert list(measure.round_robin(["a", "b", "c"], 3)) == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    calls = []
    times = measure.repeated(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)
    order = []
    times = measure.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=2, warmup=1)
    assert order == ["a", "b", "a", "b", "b", "a"] and {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}
    assert measure.markdown_table(["x", "y"], [[1, "z"]], align="lr") == ["| x | y |", "|---|---:|", "| 1 | z |"]
    where = measure.machine()
    assert where["cpu"] and where["cores"] >= 1 and where["torch"] == torch.__version__
