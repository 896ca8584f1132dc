"""benchmarks/train_step.py on a tiny base, in this process: every method steps and counts what it trains."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel
from sd_models import sdxl_text_encoder_2


@pytest.fixture(scope="module")
def entry(train_step, tiny_spec) -> dict:
    threads = torch.get_num_threads()
    workload = train_step.Workload("test", batch=2, resolution=tiny_spec.resolution, spec=tiny_spec)
    settings = train_step.Settings(repeats=1, warmup=1, threads=1)
    *_, (_, entry) = train_step.benchmark(workload, list(train_step.METHODS), settings, isolated=False)
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


def test_every_adapter_does_more_work_than_the_floor(entry):
    """The counted step: the floor's backward skips every weight gradient, so any method that
    trains UNet weights, or a ControlNet copy, adds multiply-adds; full finetuning adds the most."""
    results = by_method(entry)
    floor = results["floor"]["flops"]
    assert floor > 0 and results["floor"]["flops_ratio_to_floor"] == 1.0
    for method in ("oft", "coft", "peft_oft", "peft_lora", "controlnet", "full"):
        assert results[method]["flops"] > floor, method
    assert results["coft"]["flops"] == results["oft"]["flops"]  # the projection is elementwise
    assert results["full"]["flops"] > max(results[m]["flops"] for m in ("oft", "peft_lora"))


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


def test_report_holds_a_row_per_method(train_step, entry):
    settings = train_step.Settings()
    report = {
        "torch": torch.__version__, **vars(settings), "cpu_count": 1,
        "load_average": {"start": (0.0,) * 3, "end": (0.0,) * 3}, "workloads": [entry],
    }
    table = [line for line in train_step.to_markdown(report).splitlines() if line.startswith("|")]
    assert table[0] == "| " + " | ".join(train_step.COLUMNS) + " |"
    assert [line.split(" | ")[0] for line in table[2:]] == [f"| {method}" for method in train_step.METHODS]
    assert all(line.count("|") == len(train_step.COLUMNS) + 1 for line in table)


def test_rounds_alternate_the_methods_and_pool_their_steps(train_step, monkeypatch):
    """--rounds N: the method list runs N times over, each round starting one method later;
    each method's steps are pooled."""
    calls = []

    def fake_run(workload, method, settings, isolated):
        calls.append(method)
        seconds = {"floor": 1.0, "oft": 2.0}[method] + len(calls) / 100  # later runs slower
        return {"method": method, "median_s": seconds, "step_times_s": [seconds], "peak_memory_bytes": len(calls),
                "flops": {"floor": 10, "oft": 11}[method]}

    monkeypatch.setattr(train_step, "run_method", fake_run)
    settings = train_step.Settings(rounds=3)
    *_, (last, entry) = train_step.benchmark(train_step.WORKLOADS["tiny"], ["floor", "oft"], settings)
    assert calls == ["floor", "oft", "oft", "floor", "floor", "oft"] and last == "oft"
    floor, oft = entry["results"]
    assert floor["step_times_s"] == [1.01, 1.04, 1.05] and floor["median_s"] == 1.04 and floor["rounds"] == 3
    assert oft["step_times_s"] == [2.02, 2.03, 2.06] and oft["median_s"] == 2.03 and oft["peak_memory_bytes"] == 3
    assert oft["ratio_to_floor"] == 2.03 / 1.04 and oft["flops_ratio_to_floor"] == 1.1
    assert train_step.rounds_text(1) == "" and "each of 3 rounds" in train_step.rounds_text(3)


def test_an_sdxl_workload_steps_through_its_size_conditioning(train_step, tiny_sdxl_spec):
    threads = torch.get_num_threads()
    workload = train_step.Workload("test-sdxl", batch=2, resolution=tiny_sdxl_spec.resolution, spec=tiny_sdxl_spec, sdxl=True)
    settings = train_step.Settings(repeats=1, warmup=0, threads=1)
    *_, (_, entry) = train_step.benchmark(workload, ["floor", "coft", "controlnet"], settings, isolated=False)
    torch.set_num_threads(threads)
    results = by_method(entry)
    assert all(r["median_s"] > 0 and r["flops"] > 0 for r in results.values())
    assert results["coft"]["trainable_unet_parameters"] > 0 == results["floor"]["trainable_unet_parameters"]


def test_the_sdxl_workload_is_sdxls_architecture(train_step):
    """Built weightless: SDXL's UNet (2.57 B parameters) and second text encoder (OpenCLIP bigG, 0.69 B)."""
    tokenizer = SimpleNamespace(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**train_step.WORKLOADS["sdxl"].unet)
        text_encoder_2 = sdxl_text_encoder_2(tokenizer)
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert abs(count(unet) / 2_567_463_684 - 1) < 1e-3
    assert abs(count(text_encoder_2) / 694_659_840 - 1) < 1e-2
