"""Reading back what a run logged to its CSV files (W&B holds the same numbers)."""

from __future__ import annotations

import csv
from pathlib import Path


def logged_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """Every row the CSV logger wrote in `run_dir`, over all its versions in order (a resumed
    run adds one), with empty cells left out and `step` as an int."""
    versions = sorted(Path(run_dir).glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not versions:
        raise FileNotFoundError(f"no csv/version_*/metrics.csv in {str(run_dir)!r}; was it trained with logger=csv or many?")
    rows = []
    for path in versions:
        with open(path, newline="") as file:
            for row in csv.DictReader(file):
                values = {name: float(value) for name, value in row.items() if value not in ("", None)}
                rows.append({**values, "step": int(values["step"])})
    return rows
