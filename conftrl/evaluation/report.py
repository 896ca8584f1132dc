"""An evaluation's items and its report: which split is scored, and the scores as a table of
value, ceiling and percent of ceiling (JSON for scripts, Markdown for people)."""

from __future__ import annotations

import logging

from conftrl.evaluation.measure import Sampler, fidelity, fidelity_ceiling, first_items
from conftrl.evaluation.scorers import HIGHER_IS_BETTER, FidelityUnavailable, fidelity_scorer

log = logging.getLogger(__name__)

SPLITS = ("val", "test")


def split_items(datamodule, split: str, count: int) -> dict:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    datamodule.setup("validate" if split == "val" else "test")
    loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
    items = first_items(loader, count)
    if not items:
        raise datamodule.empty_split_error(split)
    return items


def fidelity_table(scores: dict[str, float], ceilings: dict[str, float]) -> dict[str, dict]:
    table = {}
    for name, value in scores.items():
        ceiling = ceilings[name]
        known = HIGHER_IS_BETTER[name] and ceiling > 0
        table[name] = {"value": value, "ceiling": ceiling, "percent_of_ceiling": 100 * value / ceiling if known else None}
    return table


def fidelity_report(metric: str, sample: Sampler, items: dict, estimator, batch_size: int, vae) -> dict:
    """The fidelity table of `metric`; empty, with a warning, where the data cannot be scored
    for it (segmentation or depth off ShapesWorld without an estimator)."""
    try:
        score = fidelity_scorer(metric, items, estimator)
    except FidelityUnavailable as reason:
        log.warning("%s", reason)
        return {}
    return fidelity_table(fidelity(sample, items, score, batch_size), fidelity_ceiling(items, score, batch_size, vae))


def format_number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def to_markdown(report: dict) -> str:
    """The report as a Markdown table, one row per score."""
    energy = report["hyperspherical_energy"]
    lines = [
        f"# {report['method']} / {report['annotator']} on {report['split']} ({report['num_images']} images)",
        "",
        f"Adapter `{report['adapter']}` on base `{report['base_model']}`; sampling {report['sampling']}.",
        "",
        "| metric | value | ceiling (real images through the VAE) | % of ceiling |",
        "|---|---|---|---|",
        *(
            f"| {name} | {format_number(row['value'])} | {format_number(row['ceiling'])} | {format_number(row['percent_of_ceiling'], 3)} |"
            for name, row in report["fidelity"].items()
        ),
        f"| HE change vs base, total | {energy['rel_change_total']:+.3e} | | |",
        f"| HE change vs base, largest layer | {energy['rel_change_max_abs']:.3e} | | |",
        f"| trainable parameters | {report['trainable_parameters']:,} | | |",
    ]
    return "\n".join(lines) + "\n"
