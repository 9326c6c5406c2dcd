"""Run folders: one writer at a time; read what a run wrote, refuse foreign formats and backbones (inference.py
reopens a run's trained model)."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from pathlib import Path

from . import atomic, backbones
from . import config as config_lib
from .errors import UserError
from .trust import read_json
from .yaml_files import read_yaml

RUN_FORMAT = 1  # bumped when a run folder's layout changes incompatibly


def read_metrics(run_dir) -> list[dict]:
    """metrics.jsonl records; a torn line (a kill mid-write) or any line that is not a record is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    if path.exists():
        for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                out.append(rec)
    return out


def read_eval(run_dir) -> dict:
    """eval.json ({split: metrics}), {} when there is none; a split without a numeric accuracy is an error."""
    path = Path(run_dir) / "eval.json"
    if not path.exists():
        return {}
    evals = read_json(path)
    for split, m in evals.items():
        acc = m.get("accuracy") if isinstance(m, dict) else None
        if not isinstance(acc, (int, float)) or isinstance(acc, bool):
            raise UserError(f"{path}: split {split!r} has no numeric accuracy; rerun `lorakd eval {run_dir}`")
    return evals


def load_run(run_dir):
    """(config, run.json) of a run folder, refusing foreign or newer formats."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    if not (run_dir / "run.json").exists() or not (run_dir / "config.yaml").exists():
        raise UserError(f"{run_dir}: not a lorakd run folder (no run.json/config.yaml)")
    info = read_json(run_dir / "run.json")
    if not isinstance(info.get("format"), int):
        raise UserError(f"{run_dir}/run.json: no run format number; not a lorakd run folder")
    if info["format"] > RUN_FORMAT:
        raise UserError(f"{run_dir}: written by a newer lorakd (run format {info['format']}, this one reads "
                        f"up to {RUN_FORMAT}); upgrade lorakd")
    for key in ("summary", "params"):
        if not isinstance(info.get(key, {}), dict):
            raise UserError(f"{run_dir}/run.json: {key} is not an object; the file is damaged")
    path = run_dir / "config.yaml"
    raw = read_yaml(path)  # names the file itself
    try:
        return config_lib.from_dict(raw), info
    except UserError as e:  # which run's config: report and sweeps read many
        raise UserError(f"{path}: {e}") from None


def with_backbone(cfg, info, backbone=None):
    """The run's config, its backbone optionally swapped for an equal copy (a local folder, say). A backbone of
    another architecture than the one the adapter was trained on is refused."""
    if backbone:
        cfg = config_lib.override(cfg, **{"model.backbone": backbone})
    backbones.check_trained_on(cfg.model.backbone, len(cfg.data.label_names), info)
    return cfg


def load_teacher(run_dir, student):
    """(config, run.json) of a finished run that can teach `student` (a config): the same classes, in the same
    order. A teacher trained elsewhere may name a backbone folder that is not here: the student's backbone is
    used then, when the architectures match."""
    cfg, info = load_run(run_dir)
    if info.get("status") != "done":  # half-trained weights, or a run another process is still writing
        raise UserError(f"{run_dir}: the teacher has not finished training (status {info.get('status')}); "
                        f"finish it with lorakd train --resume {run_dir}")
    if list(cfg.data.label_names) != list(student.data.label_names):  # logit i must mean the same class
        raise UserError(f"{run_dir}: the teacher's classes ({', '.join(cfg.data.label_names)}) are not the "
                        f"student's ({', '.join(student.data.label_names)}), in the same order")
    own = cfg
    cfg = config_lib.override(own, **{"model.backbone": student.model.backbone})
    with contextlib.suppress(UserError):
        backbones.resolve_backbone(own.model.backbone)
        cfg = own  # the teacher's own backbone is here: it stays
    backbones.check_trained_on(cfg.model.backbone, len(cfg.data.label_names), info)
    return cfg, info


def _open_lock(path: Path) -> int:
    """RUN/.lock opened for writing, never through a link or onto another kind of file: a `.lock` planted in a
    shared run folder (a link to ~/.bashrc, a hard link, a FIFO) would have the pid written over its target."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY, 0o666)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{path}: a symbolic link; lorakd's lock file is its own (remove the link)") from None
        raise UserError(f"{path.parent}: cannot write ({e.strerror or e})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        raise UserError(f"{path}: not a plain file of its own (a FIFO, a device or a hard link); lorakd's lock "
                        f"file is its own (remove it)")
    return fd


@contextlib.contextmanager
def run_lock(run_dir):
    """One writer per run folder: an exclusive flock on RUN/.lock while the block runs, else a UserError.

    The kernel drops a flock when its process dies, so a killed run never leaves its folder locked. The
    holder's pid is in the file, for the message. Under torchrun only rank 0 locks: the ranks are one run.
    On leaving, the lock file goes, and the folder too when this made it and nothing was written there."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: exists and is not a folder (--out)")
    path = run_dir / ".lock"
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    while True:
        try:
            atomic.folder(run_dir)  # a link planted as the run folder is refused
            fd = _open_lock(path)
        except FileNotFoundError:  # a holder that made the folder removed it as it left: make it again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{run_dir}: another lorakd process is writing to this run folder (pid {holder}); "
                            "wait for it or use another --out") from None
        try:  # the file we locked must still be the one at the path: a holder removes it as it leaves
            if os.lstat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        with contextlib.suppress(OSError):  # the pid is for the message only: a full disk still runs
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # before unlocking: a process waiting on this file then sees it gone
        os.close(fd)
        for p in made:  # deepest first; stops at the first folder something was written to
            try:
                p.rmdir()
            except OSError:
                break


def run_state(run_dir: Path, cfg, changed_key, where="now") -> str:
    """'missing', 'partial' or 'done' for a folder meant to hold a run of cfg (a sweep member, a pipeline stage).
    A run of another config there is refused, naming the first key changed_key(have, cfg) finds."""
    if not (run_dir / "run.json").exists():
        return "missing"
    have, info = load_run(run_dir)
    key = changed_key(have, cfg)
    if key:
        old, new = (config_lib.fmt_value(key, config_lib.flatten(c).get(key)) for c in (have, cfg))
        raise UserError(f"{run_dir}: holds a run of another config ({key}: {old} there, {new} {where}); use another "
                        f"--out or remove it")
    return "done" if info.get("status") == "done" else "partial"
