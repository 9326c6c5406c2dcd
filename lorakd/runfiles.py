"""Run files a run writes: run.json (made, updated, marked failed; the library versions and wall-clock
phases in it) and metrics.jsonl with its TensorBoard copy and the progress bar. runs.py reads them."""
from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import atomic, dist
from . import config as config_lib
from .errors import UserError
from .package import STARTED, __version__
from .runs import RUN_FORMAT


def update_info(run_dir: Path, **fields):
    """run.json with `fields` set (a None value removes the key), written atomically; `finished` stamped
    when the status becomes final."""
    info = json.loads((run_dir / "run.json").read_text())
    if fields.get("status") in ("done", "failed"):
        fields["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    info.update(fields)
    atomic.write_json(run_dir / "run.json", {k: v for k, v in info.items() if k not in fields or v is not None})


def library_versions() -> dict:
    """What ran the run (run.json): Python and the libraries whose versions change its numbers or its speed."""
    import platform

    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def open_run_folder(cfg, run_dir, resume, counts, fingerprint):
    """A new run's config.yaml and run.json (status running); a resumed run is marked running again."""
    if resume:  # a resumed run runs again, whatever stopped it
        update_info(run_dir, status="running", error=None, finished=None)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(run_dir / "config.yaml", config_lib.to_yaml(cfg))
    atomic.write_json(run_dir / "run.json", {
        "format": RUN_FORMAT, "lorakd": __version__, "name": cfg.name, "role": cfg.role,
        "backbone": cfg.model.backbone, "backbone_fingerprint": fingerprint,
        "params": counts, "versions": library_versions(), "status": "running",
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def mark_failed(run_dir: Path, error: Exception):
    try:  # best effort: the error itself is what the user must see
        update_info(run_dir, status="failed", error=" ".join(str(error).split())[:500] or type(error).__name__)
    except (OSError, ValueError):
        pass


class RunLog:
    """metrics.jsonl (+ TensorBoard) and the progress bar; only rank 0 writes. A train-loss record is the
    loop's one host sync per log_every steps, and where a loss that turned NaN or infinite stops the run."""

    def __init__(self, run_dir, rank, world, total, initial, steps_per_epoch, with_kd, tensorboard):
        from tqdm import tqdm

        self.path, self.rank, self.world = Path(run_dir) / "metrics.jsonl", rank, world
        self.steps_per_epoch, self.with_kd = steps_per_epoch, with_kd
        self.writer = None
        if tensorboard and rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.bar = tqdm(total=total, initial=initial, disable=rank != 0 or None, dynamic_ncols=True, mininterval=1.0)

    def record(self, rec):
        if self.rank != 0:
            return
        atomic.append_line(self.path, json.dumps(rec))
        if self.writer:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.writer.add_scalar(f"{rec['split']}/{k}", v, rec["step"])

    def train_loss(self, st, acc, lr, ckpt_path):
        """Record the mean loss since the last record (and reset the sums of `acc` and the TrainState `st`); stop
        on a diverged loss."""
        if st.acc_steps == 0:
            return
        loss, ce, kd = (dist.reduce_mean(acc.clone(), self.world) / st.acc_steps).tolist()
        lr = float(lr)  # on a GPU the schedule's copy of the device lr: read here, where the loop syncs anyway
        if not all(math.isfinite(v) for v in (loss, ce, kd)):
            kept = f"the last good checkpoint is kept in {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written"
            raise UserError(f"training loss became {loss} by step {st.step}; stopped ({kept}); try a lower train.lr")
        rec = {"step": st.step, "epoch": round(st.step / self.steps_per_epoch, 4), "split": "train", "loss": loss,
               "lr": lr, "samples_per_s": st.samples / max(st.train_time, 1e-9)}
        if self.with_kd:
            rec.update(ce=ce, kd=kd)
        self.record(rec)
        acc.zero_()
        st.acc_steps = 0
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rec['samples_per_s']:.0f}")

    def close(self):
        self.bar.close()
        if self.writer:
            self.writer.close()


class Phases:
    """Wall-clock seconds per phase of a run, as a user waits for them (run.json's summary["phases_s"]).
    Only perf_counter around whole phases: no device syncs are added (an evaluation syncs by itself).

    `start` is from lorakd's import (lorakd.STARTED) to train(): the imports and config, not the time before
    lorakd ran (a shell's `pip install ... &&`). For the process's first run only: a later run in the same
    process (the pipeline's student, a sweep's next member) waited for none of it."""
    first_run = True

    def __init__(self):
        self.t = time.perf_counter()
        self.s = {"start": self.t - STARTED if Phases.first_run else 0.0}
        Phases.first_run = False

    def total(self):
        """Start to now, as the marks add up."""
        return round(sum(self.s.values()), 3)

    def mark(self, name):
        """Add the time since the last mark to `name`."""
        now = time.perf_counter()
        self.s[name] = self.s.get(name, 0.0) + now - self.t
        self.t = now

    def rounded(self):
        return {k: round(v, 3) for k, v in self.s.items()}
