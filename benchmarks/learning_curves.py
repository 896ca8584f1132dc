"""Learning curves as a picture: a validation score against training steps, one line per method.

matplotlib is a test dependency of the project, imported only by the benchmarks that draw. The
figure is built without pyplot, so no display or global figure state is involved.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

CEILING_LABEL = "ceiling (real images through the VAE)"


def plot_curves(curves: dict[str, dict[int, float]], title: str, score: str, ceiling: float | None = None) -> Figure:
    """Each method's `{step: score}` as a line. A method validated at step 0 only (the untrained
    base) is a level drawn across the plot; the ceiling, when given, a dotted level."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    for method, curve in curves.items():
        steps = sorted(curve)
        if steps == [0]:
            axes.axhline(curve[steps[0]], color="gray", linestyle="--", label=method)
        else:
            axes.plot(steps, [curve[step] for step in steps], marker="o", markersize=3, label=method)
    if ceiling is not None:
        axes.axhline(ceiling, color="black", linestyle=":", label=CEILING_LABEL)
    axes.set(title=title, xlabel="training steps", ylabel=score)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def save_figure(figure: Figure, path: Path) -> None:
    figure.savefig(path, dpi=110)
