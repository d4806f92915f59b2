"""``distill plot``: a PNG of the dense KL, the rewards and the λ values of a run over steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from contracts.runstate import LAMBDA_PREFIX, REWARD_PREFIX


class NothingToPlot(ValueError):
    """The run has no metrics entry with a step yet."""


def series(points: list[dict[str, Any]], prefix: str) -> dict[str, tuple[list[int], list[float]]]:
    """name → (steps, values) for every metric named ``prefix<name>`` (or exactly ``prefix``)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for point in points:
        if point.get("step") is None:
            continue
        for key, value in point["values"].items():
            if value is None or not key.startswith(prefix):
                continue
            steps, values = out.setdefault(key.removeprefix(prefix) or key, ([], []))
            steps.append(int(point["step"]))
            values.append(float(value))
    return out


def plot_run(run_id: str, points: list[dict[str, Any]], out: Path) -> Path:
    """Write the three-panel figure to ``out``; NothingToPlot if no entry carries a step."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    panels = [
        ("dense KL", {k: v for k, v in series(points, "dense_kl").items()}),
        ("rewards", series(points, REWARD_PREFIX)),
        ("λ", series(points, LAMBDA_PREFIX)),
    ]
    if not any(data for _, data in panels):
        raise NothingToPlot(f"run {run_id} has no metrics to plot yet")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 9), sharex=True)
    for ax, (title, data) in zip(axes, panels, strict=True):
        for name, (steps, values) in sorted(data.items()):
            ax.plot(steps, values, label=name)
        ax.set_title(title)
        if data:
            ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("step")
    fig.suptitle(run_id)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_accuracy(rows: dict[str, dict[int, float]], out: Path) -> Path:
    """Grouped bars: held-out exact match per answer length, one bar per model (row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({n for acc in rows.values() for n in acc})
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, acc) in enumerate(rows.items()):
        xs = [j + i * width for j in range(len(lengths))]
        bars = ax.bar(xs, [acc.get(n, 0.0) for n in lengths], width, label=name)
        ax.bar_label(bars, fmt="{:.1%}", fontsize="xx-small", padding=1)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(lengths))], [f"{n}-digit" for n in lengths])
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("held-out exact match")
    # above the axes: inside, a legend hides the bars of some length whatever the figures
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(rows), fontsize="small", frameon=False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
