"""Where a canny adapter loses strict edge F1: an offset, near-miss jitter, or wrong content.

    python benchmarks/edge_errors.py --adapter outputs/canny_coft/runs/<time>/adapter [--num-images 32]

Samples the adapter's first validation images with its run's sampling settings and seeds (the
items the control_fidelity callback scores) and splits every Canny edge pixel of the samples
into exact hits, misses by 1 px and farther misses (`conftrl.metrics.edge_misses`), beside the
strict F1 and the strict F1 after each image's own best shift of up to 2 px. The same for the
real images after the base's VAE round trip: the ceiling. Prints a Markdown table.
"""

from __future__ import annotations

import argparse

import numpy as np

from conftrl.evaluation.measure import fidelity, fidelity_ceiling
from conftrl.evaluation.report import split_items
from conftrl.evaluation.scorers import control_edges
from conftrl.metrics import canny_edges, edge_misses
from conftrl.training.adapter import load_adapter

from measure import markdown_table

COLUMNS = ("strict_f1", "best_shift_f1", "exact", "within_1px", "farther")


def edge_error_scores(generated: np.ndarray, batch: dict) -> dict[str, float]:
    """Mean `edge_misses` of each image's Canny edges against its control's edge map."""
    rows = [edge_misses(canny_edges(image), edges) for image, edges in zip(generated, control_edges(batch))]
    return {name: float(np.mean([row[name] for row in rows])) for name in COLUMNS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="an adapter folder of a canny run")
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    adapter = load_adapter(args.adapter)
    items = split_items(adapter.build("data"), "val", args.num_images)
    rows = {
        "samples": fidelity(adapter.sample, items, edge_error_scores, args.batch_size),
        "real images through the VAE": fidelity_ceiling(items, edge_error_scores, args.batch_size, adapter.base.vae),
    }
    print(f"{len(items['caption'])} validation images, sampling {adapter.sampling()}\n")
    cells = [[name, *(f"{scores[c]:.3f}" for c in COLUMNS)] for name, scores in rows.items()]
    print("\n".join(markdown_table(["images", *COLUMNS], cells)))


if __name__ == "__main__":
    main()
