"""Report: per-run plots, and (across runs and sweeps) results tables, overlaid curves, accuracy vs parameters."""
from __future__ import annotations

from pathlib import Path

from . import atomic
from .runs import read_metrics


def _series(records, split, key):
    pts = [(r["step"], r[key]) for r in records if r.get("split") == split and key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _save(fig, path):
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic.write_bytes(path, buf.getvalue())


PLOTS = (("train_loss", "train", "loss", "train loss"),
         ("val_loss", "validation", "loss", "validation loss"),
         ("val_accuracy", "validation", "accuracy", "validation accuracy"))


def plot_run(run_dir):
    """plots/train_loss.png, val_loss.png, val_accuracy.png against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = Path(run_dir) / "plots"
    for name, split, key, label in PLOTS:
        xs, ys = _series(records, split, key)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(f"{Path(run_dir).name}: {label}", fontsize=9)
        ax.grid(alpha=0.3)
        _save(fig, out / f"{name}.png")
        plt.close(fig)
