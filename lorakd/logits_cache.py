"""A teacher's logits cached in its run folder (TEACHER/logits/), keyed by its trained weights and the rows: computed
once, rebuilt when either changed."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from . import atomic
from . import dist
from .errors import UserError


def weights_hash(run_dir: Path) -> str:
    """Identifies a teacher's trained weights: retraining it changes the hash and so invalidates caches."""
    files = sorted((run_dir / "adapter").glob("*.safetensors")) + sorted((run_dir / "model").glob("*.safetensors"))
    if not files:
        raise UserError(f"{run_dir}: teacher has no trained weights (adapter/ or model/); did it finish?")
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}".encode())
        with open(f, "rb") as fh:  # the head and tail of each file: cheap, and changes with the weights
            h.update(fh.read(1 << 20))
            fh.seek(max(0, st.st_size - (1 << 20)))
            h.update(fh.read())
    return h.hexdigest()[:16]


def cached_teacher_logits(teacher_dir, data_key: str, compute):
    """(logits [N, C], from cache?) over the rows data_key names, from TEACHER/logits/, recomputed when the
    teacher's weights or the rows changed (a stale or broken cache is rebuilt, never silently used)."""
    teacher_dir = Path(teacher_dir)
    key = f"{weights_hash(teacher_dir)}-{data_key}"
    path = teacher_dir / "logits" / f"{data_key}.pt"
    if path.exists():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.get("key") == key:
                return cached["logits"], True
        except Exception:  # a torn or foreign file: rebuild it
            pass
    logits = compute()
    if dist.env()[0] == 0:
        atomic.torch_save(path, {"key": key, "logits": logits})
    return logits, False
