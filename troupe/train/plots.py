"""Training plots (matplotlib, headless) and the DVC plots CSV of loss curves."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


def plot_loss(log_history: list[dict[str, Any]], out_png: str | Path, title: str) -> Path:
    """Plot loss (and learning rate on a twin axis) against optimizer step; also write ``loss.csv``
    (columns step, loss, learning_rate) beside the PNG for ``dvc plots``. Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    rows = [h for h in log_history if "loss" in h]
    with (out_png.parent / "loss.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "learning_rate"])
        for h in rows:
            w.writerow([h.get("step"), h.get("loss"), h.get("learning_rate")])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in rows], [h["loss"] for h in rows], marker="o", label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"{title} training loss")
    if rows and "learning_rate" in rows[0]:
        ax2 = ax.twinx()
        ax2.plot(
            [h["step"] for h in rows],
            [h.get("learning_rate", 0) for h in rows],
            color="gray",
            linestyle="--",
            label="lr",
        )
        ax2.set_ylabel("learning rate")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
