"""Sweeps: a grid (or a random sample of it) of configs, budget-checked before anything trains, run in-process
or one worker process per GPU, resumable. And the sweep file that fit-budget's placements make."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue as queue_lib
import random
import re
import subprocess
import sys
import threading
import traceback
from pathlib import Path

import torch
import yaml

from . import atomic
from . import config as config_lib
from . import data as data_lib
from . import budget as budget_lib
from . import train as train_lib
from .errors import UserError, brief
from .config import fmt_value
from .report import report
from .runs import load_run, run_lock, run_state

REPO = Path(__file__).resolve().parent.parent
SWEEPS = Path(__file__).resolve().parent / "sweeps"  # shipped inside the package (pyproject package-data)
SWEEP_KEYS = ("name", "base", "set", "grid", "random", "members", "out")


# ---------------------------------------------------------------- reading a sweep file

def find_sweep(name_or_path) -> Path:
    """A sweep file, or the name of one in lorakd/sweeps."""
    found = config_lib.shipped_file(SWEEPS, name_or_path)
    if not found:
        raise UserError(f"{name_or_path}: no such sweep file")
    return found


def _mapping(spec, key, path):
    value = spec.get(key) or {}
    if not isinstance(value, dict):
        raise UserError(f"{path}: sweep key {key}: expected a mapping of dotted config keys, got {value!r}")
    return value


def load_sweep(path) -> dict:
    """The sweep file's keys, checked; each problem names the file and the key."""
    path = Path(path)
    spec = config_lib.read_yaml(path)
    unknown = [k for k in spec if k not in SWEEP_KEYS]
    if unknown:
        raise UserError(f"{path}: unknown sweep key {unknown[0]!r} (known: {', '.join(SWEEP_KEYS)})")
    for key in ("name", "base", "out"):
        if key in spec and not isinstance(spec[key], str):
            raise UserError(f"{path}: sweep key {key}: expected text, got {spec[key]!r}")
    spec.setdefault("name", path.stem)
    if not _safe(spec["name"]) or not config_lib.safe_name(spec["name"]):
        raise UserError(f"{path}: sweep key name: {brief(spec['name'])} must be a plain folder name (no '/', "
                        f"'..' or leading '.')")
    _mapping(spec, "set", path)
    for key, values in _mapping(spec, "grid", path).items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: grid.{key}: expected a non-empty list of values (dotted keys, e.g. "
                            f"model.r: [4, 8])")
    members = spec.get("members") or []
    if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
        raise UserError(f"{path}: sweep key members: expected a list of mappings of dotted config keys")
    rnd = _mapping(spec, "random", path)
    if rnd:
        if not spec.get("grid"):
            raise UserError(f"{path}: sweep key random: samples from the grid, but there is no grid")
        bad = sorted(set(rnd) - {"samples", "seed"})
        if bad:
            raise UserError(f"{path}: random.{bad[0]}: unknown (known: samples, seed)")
        for key, low in (("samples", 1), ("seed", 0)):
            v = rnd.get(key, 0 if key == "seed" else None)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise UserError(f"{path}: random.{key}: expected an integer >= {low}, got {v!r}")
    return spec


def _base_path(spec, path: Path):
    """The base config: relative to the sweep file first, then the working folder, then a preset name."""
    base = spec.get("base")
    if not base:
        return None
    near = path.parent / base
    if not Path(base).is_absolute() and near.is_file():
        return near
    try:
        return config_lib.preset_path(base)
    except UserError:
        raise UserError(f"{path}: base {base!r}: no such config file (next to the sweep file or here) "
                        f"or preset") from None


def _spec_out(spec, path: Path):
    """The sweep file's own `out:`, a folder inside the one holding the file (--out on the command line goes
    anywhere): a sweep file from elsewhere must not write outside it."""
    out = spec.get("out")
    if not out:
        return None
    home = path.parent.resolve()
    if not (home / out).resolve().is_relative_to(home):  # '..', an absolute path elsewhere, a link out of it
        raise UserError(f"{path}: sweep key out: {brief(out)} is not a folder inside {path.parent}; a sweep file "
                        f"writes only beside itself (pass --out to write elsewhere)")
    return path.parent / out


def points(spec) -> list[dict]:
    """Override dicts: the grid's cartesian product (or a seeded sample of it), then the explicit members."""
    grid = spec.get("grid") or {}
    pts = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else []
    rnd = spec.get("random") or {}
    if rnd:
        keep = random.Random(rnd.get("seed", 0)).sample(range(len(pts)), min(rnd["samples"], len(pts)))
        pts = [pts[i] for i in sorted(keep)]  # grid order reads better than draw order
    pts += [dict(m) for m in spec.get("members") or []]
    return pts or [{}]  # no grid and no members: the base config alone


# ---------------------------------------------------------------- member names

def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+,-]+", "-", text).strip("-.")


def member_names(flats: list[dict], fallback="base") -> list[str]:
    """Readable folder names from the keys that differ, e.g. r=4_targets=query+value; unique and safe."""
    keys = [k for k in flats[0] if k != "name" and len({fmt_value(k, f[k]) for f in flats}) > 1]
    last = [k.rsplit(".", 1)[-1] for k in keys]
    # model.alpha and distill.alpha both differ: keep the full key for both
    short = {k: k if last.count(s) > 1 else s for k, s in zip(keys, last)}
    names = []
    for f in flats:
        name = _safe("_".join(f"{short[k]}={fmt_value(k, f[k])}" for k in keys)) or fallback
        if len(name) > 100:  # long target lists: keep the start readable, a hash keeps it unique
            name = name[:92] + "-" + hashlib.sha1(name.encode()).hexdigest()[:7]
        n, i = name, 2
        while n in names:
            n, i = f"{name}-{i}", i + 1
        names.append(n)
    return names


# ---------------------------------------------------------------- planning

_COUNTS: dict = {}


def _count(cfg) -> dict:
    key = (cfg.model, len(cfg.data.label_names))  # sweeps repeat a model config for lr/distill changes
    if key not in _COUNTS:
        _COUNTS[key] = budget_lib.count_params(cfg.model, len(cfg.data.label_names))
    return _COUNTS[key]


def _describe(point) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "the base config"


def plan(path, data=None, out=None, overrides=()):
    """(spec, sweep folder, members): every member's config built and its parameters counted, nothing run."""
    path = find_sweep(path)
    spec = load_sweep(path)
    base = _base_path(spec, path)
    raw = config_lib.read_yaml(base) if base else {}
    fixed = _mapping(spec, "set", path)
    forced = dict(config_lib.parse_override(o) for o in overrides)  # command-line key=value, over every member
    if data:
        forced["data.path"] = data
    pts = points(spec)
    for key in sorted({k for pt in pts for k in pt} & set(forced)):  # every member would become the same config
        given = "--data" if key == "data.path" and data else f"--set {key}"
        raise UserError(f"{given}: the sweep varies {key} across its members; give it in one place only")
    members, seen, classes = [], set(), {}
    for i, point in enumerate(pts):
        try:
            merged = config_lib.merge(config_lib.merge(raw, fixed), point)
            cfg = config_lib.from_dict(config_lib.merge(merged, forced))
        except UserError as e:
            named = re.search(r"config (?:key|section) (\S+?):? ", str(e) + " ")  # the key the error is about
            if named and any(k == named[1] or k.startswith(named[1] + ".") for k in forced):
                raise UserError(f"--set: {e}") from None  # the command line's key, not the member's
            raise UserError(f"{path}: member {i + 1} ({_describe(point)}): {e}") from None
        if cfg.data.path and Path(cfg.data.path).exists():  # text labels: the data's classes, read once
            key = (cfg.data.path, cfg.data.label_names)
            classes.setdefault(key, data_lib.with_label_names(cfg, lambda *a: None).data.label_names)
            cfg = config_lib.override(cfg, **{"data.label_names": list(classes[key])})
        flat = config_lib.flatten(cfg)
        key = repr(sorted(flat.items()))
        if key in seen:  # an explicit member that repeats a grid point trains once
            print(f"sweep: member {i + 1} ({_describe(point)}) repeats an earlier one; skipped")
            continue
        seen.add(key)
        members.append({"overrides": point, "cfg": cfg, "flat": flat})
    sweep_dir = Path(out) if out else _spec_out(spec, path) or Path("runs") / f"sweep-{_safe(spec['name'])}"
    for m, name in zip(members, member_names([m["flat"] for m in members], _safe(spec["name"]))):
        m["name"] = f"{name}-run" if name in RESERVED else name  # the sweep's own files keep their names
    _keep_folders(sweep_dir, members)
    for m in members:
        name = m["name"]
        m["cfg"] = config_lib.override(m["cfg"], name=f"{spec['name']}-{name}")
        m["run_dir"] = sweep_dir / name
        m["config_file"] = sweep_dir / "configs" / f"{name}.yaml"
        try:
            counts = _count(m["cfg"])
        except UserError as e:
            raise UserError(f"{path}: member {name}: {e}") from None
        m["trainable"], m["total"] = counts["trainable"], counts["total"]
        m["status"] = ("over budget" if budget_lib.over_budget(m["cfg"], m["trainable"])
                       else SWEEP_STATUS[run_state(m["run_dir"], m["cfg"], _changed_key, "in the sweep")])
    return spec, sweep_dir, members


SWEEP_STATUS = {"missing": "train", "partial": "resume", "done": "done"}  # what run_state finds -> what the sweep does


def _changed_key(have, want):
    return config_lib.changed_key(have, want, ignore=("name",))  # a member renamed by a later member keeps its run


RESERVED = {"configs", "logs", "report", "sweep.json", "sweep.yaml"}  # what a sweep folder holds besides runs


def _config_key(flat) -> str:
    return repr(sorted((k, v) for k, v in flat.items() if k != "name"))


def _keep_folders(sweep_dir, members):
    """Member names come from the keys that differ across members, so a member added to a sweep can rename
    the others: a member whose config already has a run folder in the sweep keeps that folder (its run is
    not repeated), and a new member's name steers clear of the folders kept."""
    held = {}
    for d in sorted(sweep_dir.iterdir()) if sweep_dir.is_dir() else ():
        if d.name not in RESERVED and (d / "run.json").is_file():
            try:
                cfg, _ = load_run(d)
            except UserError:  # not readable as a run: the member that owns the name reports it
                continue
            held.setdefault(_config_key(config_lib.flatten(cfg)), d.name)
    kept = {}
    for m in members:
        folder = held.get(_config_key(m["flat"]))
        if folder is not None and folder not in kept.values():
            kept[id(m)] = folder
    taken = set(kept.values())
    for m in members:
        if id(m) in kept:
            m["name"] = kept[id(m)]
            continue
        name, i = m["name"], 2
        while m["name"] in taken:
            m["name"], i = f"{name}-{i}", i + 1
        taken.add(m["name"])


def _print_table(members, budget_note=True):
    w = max(12, *(len(m["name"]) for m in members))
    print(f"{'member':<{w}} {'trainable':>12} {'budget':>12}  status")
    for m in members:
        budget = m["cfg"].model.budget if budget_lib.budget_applies(m["cfg"]) else 0
        print(f"{m['name']:<{w}} {m['trainable']:>12,} {format(budget, ',') if budget else '-':>12}  {m['status']}")
    over = [m for m in members if m["status"] == "over budget"]
    if over and budget_note:
        print(f"over budget, skipped ({len(over)}):")
        for m in over:
            print(f"  {m['name']}: {m['trainable']:,} > {m['cfg'].model.budget:,}")


def _record(sweep_dir, spec, path, members):
    """sweep.json: every member, its counts, status and folder; rewritten after each member finishes."""
    atomic.write_json(sweep_dir / "sweep.json", {
        "name": spec["name"], "source": str(path),
        "members": [{"name": m["name"], "folder": m["name"], "config": f"configs/{m['name']}.yaml",
                     "overrides": m["overrides"], "trainable": m["trainable"], "total": m["total"],
                     "budget": m["cfg"].model.budget, "status": m["status"],
                     **({"validation_accuracy": m["validation_accuracy"]} if "validation_accuracy" in m else {}),
                     **({"error": m["error"]} if "error" in m else {})} for m in members],
        "over_budget": [{"name": m["name"], "trainable": m["trainable"], "budget": m["cfg"].model.budget}
                        for m in members if m["status"] == "over budget"]})


# ---------------------------------------------------------------- running

def run_sweep(sweep_path, gpus=1, dry_run=False, data=None, out=None, overrides=()) -> list[dict]:
    """Plan every member, skip the over-budget ones, train (or resume) the rest, then report."""
    if gpus < 1:
        raise UserError(f"--gpus {gpus}: must be at least 1")
    path = find_sweep(sweep_path)
    spec, sweep_dir, members = plan(path, data=data, out=out, overrides=overrides)
    print(f"sweep {spec['name']}: {len(members)} member{'s' if len(members) != 1 else ''} in {sweep_dir}")
    _print_table(members)
    if dry_run:
        return members
    if not all(m["cfg"].data.path for m in members):
        raise UserError(f"{path}: no data.path for the members: pass --data DIR (or set data.path in the sweep)")
    # the sweep's own folder only: each member's folder is locked by whoever trains it (here, or the
    # `lorakd train` child of a parallel sweep)
    with run_lock(sweep_dir):
        _run_members(spec, path, sweep_dir, members, gpus)
    return members


def _run_members(spec, path, sweep_dir, members, gpus):
    for m in members:
        atomic.write_text(m["config_file"], config_lib.to_yaml(m["cfg"]))
    atomic.write_text(sweep_dir / "sweep.yaml", path.read_text(encoding="utf-8"))  # what made this folder
    _record(sweep_dir, spec, path, members)
    todo = [m for m in members if m["status"] in ("train", "resume")]
    if gpus == 1:
        for i, m in enumerate(todo, 1):
            print(f"\n== sweep member {i}/{len(todo)}: {m['name']} ({m['status']})")
            try:
                with run_lock(m["run_dir"]):
                    summary = train_lib.train(m["cfg"], m["run_dir"], resume=m["status"] == "resume", plots=True)
                m.update(status="done", validation_accuracy=summary.get("validation_accuracy"))
            except UserError as e:  # one bad member (say, a diverged lr) should not stop the others
                print(f"sweep member {m['name']} failed: {e}")
                m.update(status="failed", error=str(e))
            _record(sweep_dir, spec, path, members)
    else:
        _run_parallel(todo, gpus, sweep_dir, lambda: _record(sweep_dir, spec, path, members))
    print()
    _print_table(members, budget_note=False)
    if any(m["status"] == "over budget" or (m["run_dir"] / "run.json").exists() for m in members):
        report([sweep_dir], out_dir=sweep_dir / "report")
    failed = [m["name"] for m in members if m["status"] == "failed"]
    if failed:
        raise UserError(f"{len(failed)} sweep member(s) failed: {', '.join(failed)} (see {sweep_dir}/sweep.json"
                        + (f" and {sweep_dir}/logs" if gpus > 1 else "") + "); run the sweep again to resume")


def _gpu_ids(gpus) -> list[str]:
    """GPU ids for the children: the first N of CUDA_VISIBLE_DEVICES when it is set, else 0..N-1."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [s.strip() for s in visible.split(",") if s.strip()] if visible else [str(i) for i in range(gpus)]
    if len(ids) < gpus:
        raise UserError(f"--gpus {gpus}: CUDA_VISIBLE_DEVICES={visible} lists only {len(ids)}")
    return ids[:gpus]


def _worker_command() -> list[str]:
    return [sys.executable, "-m", "lorakd.sweep"]


def _run_parallel(todo, gpus, sweep_dir, record):
    """One long-lived worker process per GPU (`python -m lorakd.sweep`, see worker()) trains members one at a
    time: imports, CUDA start-up and warm caches are paid once per GPU, not once per member. Each member's
    output goes to logs/NAME.log (a streamed log: it grows while the member trains, so not written atomically)."""
    env = dict(os.environ)
    # the workers import this same lorakd, even from a checkout that is not installed
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    answers = queue_lib.Queue()  # (gpu, answer line or None at the worker's end), from one reader thread each
    workers, busy, idle, todo = {}, {}, _gpu_ids(gpus), list(todo)
    where = "GPU" if torch.cuda.is_available() else "CPU worker"
    if where != "GPU":
        print(f"sweep: no CUDA GPU is visible: --gpus {gpus} runs {gpus} CPU processes side by side, which share "
              f"this machine's cores (on a CPU one at a time is faster: leave out --gpus)")

    def start(gpu):
        proc = subprocess.Popen(_worker_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={**env, "CUDA_VISIBLE_DEVICES": gpu})
        threading.Thread(target=_relay, args=(proc, gpu, answers), daemon=True).start()
        workers[gpu] = proc

    try:
        while todo or busy:
            while todo and idle:
                m, gpu = todo.pop(0), idle.pop(0)
                if gpu not in workers:
                    start(gpu)
                log_path = sweep_dir / "logs" / f"{m['name']}.log"
                atomic.folder(log_path.parent)
                task = {"config": str(m["config_file"]), "run_dir": str(m["run_dir"]), "log": str(log_path),
                        "resume": m["status"] == "resume"}
                workers[gpu].stdin.write(json.dumps(task) + "\n")
                workers[gpu].stdin.flush()
                busy[gpu] = (m, log_path)
                print(f"sweep member {m['name']}: started on {where} {gpu} ({m['status']}; log {log_path})")
            gpu, line = answers.get()
            if line is None:  # the worker exited (a crash, a kill): a fresh one takes this GPU's next member
                rc = workers.pop(gpu).wait()
            if gpu not in busy:
                continue
            m, log_path = busy.pop(gpu)
            if line is not None:
                rc = json.loads(line)["rc"]
            idle.append(gpu)
            _finish(m, rc, log_path)
            record()
    finally:  # workers stop when their input closes; an interrupted sweep stops them (they checkpoint on
        for gpu, proc in workers.items():  # SIGTERM and resume next time)
            if gpu in busy:
                proc.terminate()
            try:
                proc.stdin.close()
            except OSError:
                pass
            proc.wait()


def _relay(proc, gpu, answers):
    """A worker's answers into the parent's queue, then None when its output ends (it exited)."""
    for line in proc.stdout:
        answers.put((gpu, line))
    answers.put((gpu, None))


def worker():
    """A parallel sweep's worker on one GPU: trains each member the parent sends (one JSON line on stdin) in
    this process and answers one JSON line {"rc": 0 | 1} on stdout; a member's own output goes to its log."""
    answer = os.fdopen(os.dup(1), "w", buffering=1)
    for line in sys.stdin:
        task = json.loads(line)
        run_dir = Path(task["run_dir"])
        fd = os.open(task["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)  # never a link
        with open(fd, "ab", buffering=0) as log:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(log.fileno(), 1)  # the fds, not just sys.stdout: native libraries' output lands there too
            os.dup2(log.fileno(), 2)
            rc = 0
            try:
                cfg = load_run(run_dir)[0] if task["resume"] else config_lib.load(task["config"])
                with run_lock(run_dir):
                    train_lib.train(cfg, run_dir, resume=task["resume"], plots=True)
                print(f"run folder: {run_dir}")
            except UserError as e:
                print(f"error: {e}")
                rc = 1
            except Exception:  # noqa: BLE001  one broken member must not take the others on this GPU down
                traceback.print_exc()
                rc = 1
            sys.stdout.flush(), sys.stderr.flush()
        answer.write(json.dumps({"rc": rc}) + "\n")
    os._exit(0)  # input closed, every member answered: skip the interpreter's slow teardown (as cli.entry)


def _finish(m, rc, log_path):
    info = load_run(m["run_dir"])[1] if (m["run_dir"] / "run.json").exists() else {}
    if rc == 0 and info.get("status") == "done":
        m.update(status="done", validation_accuracy=(info.get("summary") or {}).get("validation_accuracy"))
        print(f"sweep member {m['name']}: done")
        return
    lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines() if log_path.exists() else []
    m.update(status="failed", error=f"exit {rc}: {lines[-1] if lines else 'no output'}")
    print(f"sweep member {m['name']}: failed ({m['error']})")


# ---------------------------------------------------------------- fit-budget's sweep file

def write_fit_sweep(path, props, budget, backbone, num_labels):
    """A sweep file with one member per proposal, on the reference student recipe."""
    fixed = {"model.backbone": backbone, "model.budget": budget}
    if num_labels != 4:  # the recipe has the 4 AG News classes; the head's size depends on the count
        fixed["data.label_names"] = [f"class{i}" for i in range(num_labels)]
    spec = {"name": _safe(f"fit-{Path(backbone).name}-{budget}"), "base": "agnews-minilm", "set": fixed,
            "members": [{"model.r": p["r"], "model.targets": list(p["targets"]), "model.layers": list(p["layers"])}
                        for p in props]}
    head = (f"# Written by `lorakd fit-budget`: the {len(props)} adapter placements of {backbone} with the most\n"
            f"# trainable parameters within {budget:,}, on the reference student recipe (preset agnews-minilm).\n"
            + ("# data.label_names are placeholders: put your class names there.\n" if num_labels != 4 else ""))
    atomic.write_text(path, head + yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, width=120))


if __name__ == "__main__":  # a parallel sweep's worker (see _run_parallel)
    worker()
