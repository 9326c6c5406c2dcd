"""Report across runs and sweeps: one row per run (sweep members that never ran too), the results tables
(Markdown, CSV) and one self-contained HTML page with the plots (see plots)."""
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
from .plots import curve_plots, params_plot, plain_text
from .runs import load_run, read_eval, read_json


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


# ---------------------------------------------------------------- labels (the plots' and the table's)

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
    with plain_text():
        plots = {**curve_plots(rows), "accuracy_vs_params": params_plot(rows)}
    atomic.write_text(out / "results.md", md)
    atomic.write_text(out / "results.csv", csv_text(rows, keys))
    for name, png in plots.items():
        atomic.write_bytes(out / f"{name}.png", png)
    atomic.write_text(out / "report.html", html_page(header, cells, plots, paths))
    print(md, end="")
    print(f"report: {out}")
    return {"out": out, "rows": rows, "keys": keys, "markdown": md}
