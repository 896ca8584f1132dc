"""benchmarks/train_step.py on a tiny base, in this process: every method steps and counts what it trains."""

from __future__ import annotations


import pytest
import torch


@pytest.fixture(scope="module")
def entry(train_step, tiny_spec) -> dict:
    threads = torch.get_num_threads()
    workload = train_step.Workload("test", batch=2, resolution=tiny_spec.resolution, spec=tiny_spec)
    settings = train_step.Settings(repeats=1, warmup=1, threads=1)
    *_, entry = train_step.benchmark(workload, list(train_step.METHODS), settings, isolated=False)
    torch.set_num_threads(threads)
    return entry


def by_method(entry: dict) -> dict[str, dict]:
    return {r["method"]: r for r in entry["results"]}


def test_every_method_takes_a_timed_step(train_step, entry):
    results = by_method(entry)
    assert list(results) == list(train_step.METHODS)
    for result in results.values():
        assert len(result["step_times_s"]) == 1 and result["median_s"] > 0
        assert result["peak_memory_bytes"] >= 0
    assert results["floor"]["ratio_to_floor"] == 1.0 and results["floor"]["memory_ratio_to_floor"] == 1.0


def test_trainable_parameters_are_what_each_method_trains(entry):
    results = by_method(entry)
    floor, oft, lora, full = (results[m] for m in ("floor", "oft", "peft_lora", "full"))
    unet = floor["unet_parameters"]
    assert floor["trainable_unet_parameters"] == 0 < floor["trainable_parameters"]  # the control encoder
    encoder = floor["trainable_parameters"]
    # The same blocks, so the same count for both OFT implementations and for COFT.
    assert results["peft_oft"]["trainable_unet_parameters"] == results["coft"]["trainable_unet_parameters"] \
        == oft["trainable_unet_parameters"] > 0
    assert oft["trainable_parameters"] == encoder + oft["trainable_unet_parameters"]
    # LoRA's rank is chosen to match OFT's count as nearly as an integer rank can.
    per_rank = lora["trainable_unet_parameters"] / lora["lora_rank"]
    assert abs(lora["trainable_unet_parameters"] - oft["trainable_unet_parameters"]) <= per_rank / 2
    assert 0.5 < lora["trainable_unet_parameters"] / oft["trainable_unet_parameters"] < 2
    assert results["controlnet"]["trainable_unet_parameters"] == 0
    assert results["controlnet"]["trainable_parameters"] > unet / 3  # a copy of the encoder half
    assert full["trainable_unet_parameters"] == unet
    assert full["trainable_parameters"] == unet + encoder


def test_report_holds_a_row_and_the_applicable_targets(train_step, entry):
    settings = train_step.Settings()
    report = {
        "torch": torch.__version__, **vars(settings), "cpu_count": 1,
        "load_average": {"start": (0.0,) * 3, "end": (0.0,) * 3}, "workloads": [entry],
    }
    markdown = train_step.to_markdown(report)
    for method in train_step.METHODS:
        assert f"| {method} |" in markdown
    checked = {(c["quantity"], c["against"]) for c in entry["checks"]}
    # On a CPU the GPU-only bf16 target does not apply; the others do.
    assert checked == {(t.quantity, t.against) for t in train_step.TARGETS if t.device != "cuda"}
