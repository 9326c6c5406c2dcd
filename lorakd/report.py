"""Report: per-run plots, and (across runs and sweeps) results tables, overlaid curves, accuracy vs parameters."""
from __future__ import annotations

import base64
import csv
import html
import io
from datetime import datetime
from pathlib import Path

from . import atomic
from . import config as config_lib
from .config import fmt_value
from .errors import UserError, brief
from .runs import load_run, read_eval, read_json, read_metrics


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


def _plain_text():
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
    with _plain_text():
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


# ---------------------------------------------------------------- values and the Pareto front

def pareto_front(points) -> list[int]:
    """Indices of the (params, accuracy) points that no other point dominates, i.e. none has <= params and
    >= accuracy with at least one of the two strictly better; sorted by params. Equal points all stay."""
    front = []
    for i, (p, a) in enumerate(points):
        if not any(q <= p and b >= a and (q < p or b > a) for j, (q, b) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


# ---------------------------------------------------------------- collecting runs

def _run_row(run_dir: Path) -> dict:
    cfg, info = load_run(run_dir)
    summary = info.get("summary") or {}
    ev = read_eval(run_dir)
    # eval.json wins: `lorakd eval` may have added a test split after training
    val = (ev.get("validation") or {}).get("accuracy", summary.get("validation_accuracy"))
    test = (ev.get("test") or {}).get("accuracy", summary.get("test_accuracy"))
    status = str(info.get("status", "?"))
    return {"name": run_dir.name, "dir": run_dir, "flat": config_lib.flatten(cfg), "group": _group(run_dir),
            "status": "unfinished" if status == "running" else status,  # a killed run still says running
            "trainable": _number(summary.get("trainable", (info.get("params") or {}).get("trainable"))),
            "validation_accuracy": _number(val), "test_accuracy": _number(test),
            "best_step": _number(summary.get("best_step"), int), "train_time_s": _number(summary.get("train_time_s")),
            "samples_per_s": _number(summary.get("samples_per_s"))}


def _group(run_dir: Path) -> tuple[str, str] | None:
    """("pipeline", its folder's name) for a pipeline's teacher or student, ("sweep", ...) for a sweep member."""
    parent = run_dir.parent
    stage = run_dir.name == "student" or run_dir.name.startswith("teacher")  # teacher-r2-1: a later round's
    if stage and ((parent / "pipeline.json").exists() or
                                                   (parent / "teacher" / "run.json").exists()):
        return "pipeline", parent.name
    if (parent / "sweep.json").exists():
        return "sweep", parent.name
    return None


def _skipped_rows(sweep_dir: Path, rows) -> list[dict]:
    """Sweep members that have no run to show, from the sweep's sweep.json: over the budget (never trained)
    or failed before their run folder was written. A failed member that has one is marked failed in `rows`."""
    path = sweep_dir / "sweep.json"
    if not path.exists():
        return []
    by_dir = {r["dir"].name: r for r in rows}
    members = read_json(path).get("members", [])
    if not isinstance(members, list):
        raise UserError(f"{path}: members is not a list; the file is damaged")
    skipped = []
    for i, m in enumerate(members, 1):
        status = m.get("status") if isinstance(m, dict) else None
        if status not in ("over budget", "failed"):
            continue
        if isinstance(m.get("folder"), str) and m["folder"] in by_dir:
            by_dir[m["folder"]]["status"] = status
            continue
        cfg_file = _member_config(sweep_dir, m.get("config", ""), f"{path}: member {i}")
        flat = config_lib.flatten(config_lib.load(cfg_file)) if cfg_file and cfg_file.is_file() else {}
        skipped.append({"name": str(m.get("name", "?")), "dir": None, "flat": flat, "group": ("sweep", sweep_dir.name),
                        "status": status,
                        "trainable": _number(m.get("trainable")), "validation_accuracy": None, "test_accuracy": None,
                        "best_step": None, "train_time_s": None, "samples_per_s": None})
    return skipped


def _member_config(sweep_dir: Path, name, where):
    """A member's config file named by sweep.json: a file inside the sweep folder (configs/NAME.yaml), else a
    one-line error; a sweep.json from elsewhere must not have report read any file it names."""
    if not isinstance(name, str):
        raise UserError(f"{where}: config is {brief(name)}, not a file name; the file is damaged")
    if not name:
        return None
    home = sweep_dir.resolve()
    if Path(name).is_absolute() or not (home / name).resolve().is_relative_to(home):
        raise UserError(f"{where}: config {brief(name)} is outside the sweep folder; refused")
    return sweep_dir / name


def _number(value, kinds=(int, float)):
    """A count or score read from a file lorakd wrote: a number, else None (a damaged file shows a blank)."""
    return value if isinstance(value, kinds) and not isinstance(value, bool) else None


def collect(paths) -> list[dict]:
    """One row per run: run folders (with run.json) as given, sweep folders searched one level down."""
    rows = []
    for p in map(Path, paths):
        if (p / "run.json").exists():
            rows.append(_run_row(p))
            continue
        if not p.is_dir():
            raise UserError(f"{p}: no such run or sweep folder")
        found = [_run_row(d) for d in sorted(p.iterdir()) if (d / "run.json").exists()]
        found += _skipped_rows(p, found)
        if not found:
            raise UserError(f"{p}: neither a run folder (no run.json) nor a sweep folder (no run folders in it)")
        rows += found
    by_dir = {}  # a run given on its own and inside its sweep folder is one row
    for r in rows:
        by_dir.setdefault(r["dir"].resolve() if r["dir"] else id(r), r)
    rows = list(by_dir.values())
    # the same folder name from two sweeps: tell them apart by the parent folder
    names = [r["name"] for r in rows]
    for r in rows:
        if names.count(r["name"]) > 1 and r["dir"] is not None:
            r["name"] = f"{r['dir'].parent.name}/{r['name']}"
    rows.sort(key=lambda r: (r["validation_accuracy"] is None, -(r["validation_accuracy"] or 0.0), r["name"]))
    for r, label in zip(rows, run_labels(rows)):
        r["label"] = label
    return rows


def differing_keys(rows) -> list[str]:
    """Config keys (in config order) whose values are not the same in every row; the name always differs."""
    flats = [r["flat"] for r in rows if r["flat"]]
    keys = []
    for k in (flats[0] if flats else {}):
        if k != "name" and len({fmt_value(k, f.get(k)) for f in flats}) > 1:
            keys.append(k)
    return keys


# ---------------------------------------------------------------- tables

def _table(rows, keys):
    """(header, rows of cells) shared by Markdown, CSV and HTML."""
    with_test = any(r["test_accuracy"] is not None for r in rows)
    header = ["run", "val acc"] + (["test acc"] if with_test else []) + ["trainable", *keys] + \
        ["best step", "train s", "samples/s", "status"]

    def num(v, f):
        return "" if v is None else format(v, f)

    cells = []
    for r in rows:
        cells.append([r["label"], num(r["validation_accuracy"], ".4f")]
                     + ([num(r["test_accuracy"], ".4f")] if with_test else [])
                     + [num(r["trainable"], ","), *(cell_value(r["flat"], k) for k in keys)]
                     + [num(r["best_step"], "d"), num(r["train_time_s"], ".1f"), num(r["samples_per_s"], ".0f"),
                        r["status"]])
    return header, cells


LORA_KEYS = ("model.r", "model.alpha", "model.dropout", "model.targets", "model.layers")


def _local(value: str) -> str:
    """A local path as its last part (a table cell is no place for /home/...); anything else as it is."""
    return Path(value).name if isinstance(value, str) and Path(value).is_absolute() else value


def cell_value(flat, key) -> str:
    """A config value for a table cell or a label: a full fine-tune's rank is "full" (it has no adapters, so
    the other LoRA keys are "-"), and local paths are their last part."""
    if key in LORA_KEYS and flat.get("model.full_finetune"):
        return "full" if key == "model.r" else "-"
    value = flat.get(key, "")
    value = [_local(v) for v in value] if isinstance(value, (list, tuple)) else _local(value)
    return fmt_value(key, value)


def markdown(header, cells) -> str:
    def esc(s):  # a name's raw HTML shows as text wherever the Markdown is rendered
        return html.escape(str(s), quote=False).replace("|", "\\|")

    lines = ["| " + " | ".join(map(esc, header)) + " |",
             "|" + "|".join("---" if i == 0 else "---:" if h in _NUMERIC else "---" for i, h in enumerate(header)) + "|"]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in cells]
    return "\n".join(lines) + "\n"


_NUMERIC = {"trainable", "val acc", "test acc", "best step", "train s", "samples/s"}


def csv_text(rows, keys) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", *keys, "trainable", "validation_accuracy", "test_accuracy", "best_step", "train_time_s",
                "samples_per_s", "status", "folder"])
    for r in rows:  # names and values come from run folders: no cell may be a spreadsheet formula
        w.writerow(map(atomic.csv_cell, [r["name"], *(fmt_value(k, r["flat"].get(k, "")) for k in keys)]
                   + ["" if r[k] is None else r[k] for k in ("trainable", "validation_accuracy", "test_accuracy",
                                                             "best_step", "train_time_s", "samples_per_s")]
                   + [r["status"], "" if r["dir"] is None else str(r["dir"])]))
    return buf.getvalue()


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


_SHORT_TARGETS = {"query": "q", "key": "k", "value": "v", "dense": "d", "attention.output.dense": "ao",
                  "output.dense": "o", "intermediate.dense": "i"}


def short_label(row, keys) -> str:
    """A compact name from the config keys that differ across runs: r8 qv L0,1,5; a full fine-tune is "full"."""
    parts, flat = [], row["flat"]
    full = bool(flat.get("model.full_finetune"))
    if full:
        parts.append("full")
    for k in keys:
        v = flat.get(k)
        if full and k in (*LORA_KEYS, "model.full_finetune"):
            continue
        if k == "model.full_finetune":
            parts.append("lora")
        elif k == "model.r":
            parts.append(f"r{v}")
        elif k == "model.alpha":
            parts.append(f"a{v:g}")
        elif k == "model.targets":
            short = [_SHORT_TARGETS.get(t, t.split(".")[-1]) for t in v]
            parts.append("".join(short) if all(len(t) == 1 for t in short) else "+".join(short))
        elif k == "model.layers":
            parts.append(f"L{','.join(map(str, v))}" if v else "")
        elif v is not None:
            parts.append(cut(f"{k.split('.')[-1]}={cell_value(flat, k)}", 16))
    return " ".join(p for p in parts if p) or row["name"]


LABEL_MAX = 32  # characters of a plot label: a legend beside a 5-inch plot stays narrow


def cut(text: str, n: int) -> str:
    """text in at most n characters, its start and end kept (a pipeline's stage, a timestamp's seconds)."""
    return text if len(text) <= n else text[: n // 2 - 1] + "…" + text[len(text) - (n - n // 2):]


def run_labels(rows) -> list[str]:
    """A short, unique label per row, for the plots and the table: "<pipeline>: teacher" for a pipeline's
    stages, the keys that differ within its sweep for a sweep member (r8 qv; "full" for a full fine-tune), the
    folder name for a run of its own; at most LABEL_MAX characters, numbered where two would be the same."""
    labels = []
    for r in rows:
        kind, name = r.get("group") or (None, None)
        members = [m for m in rows if m.get("group") == r.get("group")]
        if kind == "pipeline":
            label = f"{cut(name, LABEL_MAX - 9)}: {r['name'].split('/')[-1]}"
        elif kind == "sweep" and len(members) > 1:
            label = short_label(r, differing_keys(members))
            if sum(g == "sweep" for g, _ in {m["group"] for m in rows if m.get("group")}) > 1:
                label = f"{name}: {label}"  # members of two sweeps: which one
        else:
            label = r["name"].split("/")[-1]
        labels.append(cut(label, LABEL_MAX))
    for i, label in enumerate(labels):
        same = [j for j, other in enumerate(labels) if other == label]
        if len(same) > 1:
            for k, j in enumerate(same, 1):
                labels[j] = f"{cut(label, LABEL_MAX - 4)} ({k})"
    return labels


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


# ---------------------------------------------------------------- the report

# a table as wide as the window at most: a long value (a member's name, a list of modules) wraps in its cell
_CSS = ("body{font-family:sans-serif;margin:1.5em;color:#222}"
        "table{border-collapse:collapse;font-size:13px;max-width:100%}"
        "th,td{border:1px solid #ccc;padding:3px 6px;overflow-wrap:anywhere}th{background:#f0f0f0}"
        "td.n{text-align:right;white-space:nowrap}img{width:640px;max-width:100%;margin:4px}"
        ".plots{display:flex;flex-wrap:wrap;align-items:flex-start}")


def html_page(header, cells, plots: dict[str, bytes], sources) -> str:
    """One self-contained page: the table and every plot inline as a base64 PNG data URI."""
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class=\"{'n' if h in _NUMERIC else ''}\">{e(c)}</td>"
                                     for h, c in zip(header, row)) + "</tr>\n" for row in cells)
    imgs = "".join(f"<img alt=\"{e(name)}\" src=\"data:image/png;base64,{base64.b64encode(png).decode()}\">\n"
                   for name, png in plots.items())
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>lorakd report</title>"
            f"<style>{_CSS}</style></head><body>\n<h1>lorakd report</h1>\n"
            f"<p>{len(cells)} runs from {e(', '.join(map(str, sources)))}; {e(stamp)}. "
            f"Sorted by validation accuracy.</p>\n<table><tr>{head}</tr>\n{body}</table>\n"
            f"<h2>Plots</h2>\n<div class=\"plots\">\n{imgs}</div>\n</body></html>\n")


def report(paths, out_dir="report") -> dict:
    """results.md, results.csv, four PNG plots and report.html in out_dir; prints the Markdown table."""
    if not paths:
        raise UserError("report: give at least one run or sweep folder")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder (--out)")
    unique = {}  # a folder named twice (or as ./x and x) is one row
    for p in paths:
        unique.setdefault(Path(p).resolve(), p)
    paths = list(unique.values())
    rows = collect(paths)
    keys = differing_keys(rows)
    header, cells = _table(rows, keys)
    md = markdown(header, cells)
    with _plain_text():
        plots = {**curve_plots(rows), "accuracy_vs_params": params_plot(rows)}
    atomic.write_text(out / "results.md", md)
    atomic.write_text(out / "results.csv", csv_text(rows, keys))
    for name, png in plots.items():
        atomic.write_bytes(out / f"{name}.png", png)
    atomic.write_text(out / "report.html", html_page(header, cells, plots, paths))
    print(md, end="")
    print(f"report: {out}")
    return {"out": out, "rows": rows, "keys": keys, "markdown": md}
