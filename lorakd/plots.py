"""Plots: a run's own curves (plots/*.png, drawn as it finishes), and for a report every run's curves overlaid and
accuracy against trainable parameters with the Pareto front; matplotlib only, files only (no display)."""
from __future__ import annotations

import io
from pathlib import Path

from . import atomic
from .runs import read_metrics


# ---------------------------------------------------------------- a run's own plots

def _series(records, split, key):
    pts = [(r["step"], r[key]) for r in records if r.get("split") == split and key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def _png(fig, tight=True) -> bytes:
    buf = io.BytesIO()
    # "tight" draws the figure twice (once to measure it); a run's own plots use fixed margins instead
    fig.savefig(buf, format="png", dpi=110, **({"bbox_inches": "tight"} if tight else {}))
    return buf.getvalue()


PLOTS = (("train_loss", "train", "loss", "train loss"),
         ("val_loss", "validation", "loss", "validation loss"),
         ("val_accuracy", "validation", "accuracy", "validation accuracy"))


def plain_text():
    """Plot text as typed: a run or config name holding `$...$` is not parsed as TeX (mathtext), which would fail
    on a name like `$\\bogus{$` and lose the plot, or the run with it."""
    import matplotlib

    return matplotlib.rc_context({"text.parse_math": False, "text.usetex": False})


def import_plotting():
    """What plot_run imports (train imports it in a thread while the GPU trains)."""
    from matplotlib.backends import backend_agg  # noqa: F401
    from matplotlib.figure import Figure  # noqa: F401


def plot_run(run_dir):
    """plots/train_loss.png, val_loss.png, val_accuracy.png against steps.

    Drawn on bare matplotlib Figures (Agg), not pyplot: every `lorakd train` waits for these, and pyplot
    adds its import, a backend and global figure state for nothing here."""
    from matplotlib.figure import Figure

    records = read_metrics(run_dir)
    out = Path(run_dir) / "plots"
    with plain_text():
        for name, split, key, label in PLOTS:
            xs, ys = _series(records, split, key)
            fig = Figure(figsize=(5, 3.2))
            fig.subplots_adjust(left=0.15, right=0.97, bottom=0.15, top=0.9)  # room for labels like "0.8795"
            ax = fig.subplots()
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3)
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            ax.set_title(f"{Path(run_dir).name}: {label}", fontsize=9)
            ax.grid(alpha=0.3)
            atomic.write_bytes(out / f"{name}.png", _png(fig, tight=False))


# ---------------------------------------------------------------- the Pareto front (what params_plot names)

def pareto_front(points) -> list[int]:
    """Indices of the (params, accuracy) points that no other point dominates, i.e. none has <= params and
    >= accuracy with at least one of the two strictly better; sorted by params. Equal points all stay."""
    front = []
    for i, (p, a) in enumerate(points):
        if not any(q <= p and b >= a and (q < p or b > a) for j, (q, b) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


# ---------------------------------------------------------------- plots across runs

def _colors(n):
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def curve_plots(rows) -> dict[str, bytes]:
    """Train loss, validation loss and validation accuracy against steps, every run overlaid."""
    plt = _pyplot()
    runs = [r for r in rows if r["dir"] is not None]
    records = {r["name"]: read_metrics(r["dir"]) for r in runs}
    colors = _colors(len(runs))
    out = {}
    for name, split, key, label in PLOTS:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for r, color in zip(runs, colors):
            xs, ys = _series(records[r["name"]], split, key)
            if xs:
                ax.plot(xs, ys, color=color, lw=1.2, marker="o" if len(xs) < 20 else None, ms=2.5, label=r["label"])
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        if ax.lines:
            _legend_beside(ax)
        out[name] = _png(fig)
        plt.close(fig)
    return out


def params_plot(rows) -> bytes:
    """Validation accuracy against trainable parameters; the Pareto front drawn as a red staircase. Each run
    named is a coloured point in the legend, outside the axes: labels never overlap the points or each other."""
    plt = _pyplot()
    pts = [r for r in rows if r["validation_accuracy"] is not None and r["trainable"] is not None]
    xy = [(r["trainable"], r["validation_accuracy"]) for r in pts]
    front = pareto_front(xy)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    if xy:
        # many runs: only the front is named (a legend of dozens is no help; the table names every run)
        named = list(range(len(pts))) if len(pts) <= 10 else front
        others = [i for i in range(len(pts)) if i not in named]
        if others:
            ax.scatter([xy[i][0] for i in others], [xy[i][1] for i in others], s=12, color="0.6", label="other runs",
                       zorder=2)
        for i, color in zip(named, _colors(len(named))):
            ax.scatter([xy[i][0]], [xy[i][1]], s=18, color=color, label=pts[i]["label"], zorder=2)
        fx, fy = [xy[i][0] for i in front], [xy[i][1] for i in front]
        ax.plot(fx, fy, color="tab:red", drawstyle="steps-post", lw=1, zorder=1)
        ax.scatter(fx, fy, s=40, facecolors="none", edgecolors="tab:red", label="Pareto front", zorder=3)
        if max(p for p, _ in xy) > 20 * max(1, min(p for p, _ in xy)):
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e3:g}k" if v < 1e6 else f"{v / 1e6:g}M"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        _legend_beside(ax)
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("validation accuracy")
    ax.set_title("accuracy vs trainable parameters", fontsize=9)
    ax.grid(alpha=0.3)
    data = _png(fig)
    plt.close(fig)
    return data


def _legend_beside(ax):
    """The legend right of the axes, never over the data; the tight PNG widens to hold it."""
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)

