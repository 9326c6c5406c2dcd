"""Distillation: the student loss, and teacher logits computed once and cached in the teacher's run folder."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

from . import atomic
from .errors import UserError


def student_loss(logits, labels, teacher_probs, alpha: float, temperature: float):
    """(loss, ce, kd): alpha * CE(y, s) + (1 - alpha) * T^2 * KL(p_teacher^T || softmax(s / T)).

    teacher_probs are the teachers' softened (and averaged) distributions at T; None means plain CE."""
    ce = F.cross_entropy(logits, labels)
    if teacher_probs is None:
        return ce, ce, torch.zeros_like(ce)
    log_student = F.log_softmax(logits / temperature, dim=-1)
    kl = (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_student).sum(-1).mean()
    kd = temperature ** 2 * kl
    return alpha * ce + (1 - alpha) * kd, ce, kd


def soften(teacher_logits: list[torch.Tensor], weights, temperature: float) -> torch.Tensor:
    """Average of the teachers' softmax(logits / T), weighted; rows sum to 1."""
    w = torch.tensor(weights or [1.0] * len(teacher_logits), dtype=torch.float64)
    w = w / w.sum()
    probs = sum(wi * F.softmax(t.double() / temperature, dim=-1) for wi, t in zip(w, teacher_logits))
    return probs.float()


def _weights_hash(run_dir: Path) -> str:
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


def cached_teacher_logits(teacher_dir, data_key: str, compute) -> torch.Tensor:
    """Logits [N, C] over the training split from TEACHER/logits/, recomputed when the teacher's weights
    or the data changed (a stale or broken cache is rebuilt, never silently used)."""
    teacher_dir = Path(teacher_dir)
    key = f"{_weights_hash(teacher_dir)}-{data_key}"
    path = teacher_dir / "logits" / f"{data_key}.pt"
    if path.exists():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.get("key") == key:
                return cached["logits"], True
        except Exception:  # a torn or foreign file: rebuild it
            pass
    logits = compute()
    atomic.torch_save(path, {"key": key, "logits": logits})
    return logits, False
