"""Sweeps: a grid (or a random sample of it) of configs, budget-checked before anything trains, run in-process
or one worker process per GPU (sweep_workers), resumable. And the sweep file that fit-budget's placements make."""
from __future__ import annotations

import hashlib
import itertools
import random
import re
from pathlib import Path

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
from .sweep_workers import run_parallel
from .yaml_files import preset_path, read_yaml, shipped_file

SWEEPS = Path(__file__).resolve().parent / "sweeps"  # shipped inside the package (pyproject package-data)
SWEEP_KEYS = ("name", "base", "set", "grid", "random", "members", "out")


# ---------------------------------------------------------------- reading a sweep file

def find_sweep(name_or_path) -> Path:
    """A sweep file, or the name of one in lorakd/sweeps."""
    found = shipped_file(SWEEPS, name_or_path)
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
    spec = read_yaml(path)
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
        return preset_path(base)
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
    raw = read_yaml(base) if base else {}
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
        run_parallel(todo, gpus, sweep_dir, lambda: _record(sweep_dir, spec, path, members))
    print()
    _print_table(members, budget_note=False)
    if any(m["status"] == "over budget" or (m["run_dir"] / "run.json").exists() for m in members):
        report([sweep_dir], out_dir=sweep_dir / "report")
    failed = [m["name"] for m in members if m["status"] == "failed"]
    if failed:
        raise UserError(f"{len(failed)} sweep member(s) failed: {', '.join(failed)} (see {sweep_dir}/sweep.json"
                        + (f" and {sweep_dir}/logs" if gpus > 1 else "") + "); run the sweep again to resume")


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

