"""Distillation, all of it: which teachers, the transfer rows they label, their logits over any rows (computed
once, cached in the teacher's run folder: logits_cache), averaging them into soft targets, and the student's loss."""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from . import data as data_lib
from . import readers
from . import rows as rows_lib
from .errors import UserError
from .inference import open_loaded
from .logits_cache import cached_teacher_logits
from .runs import load_teacher


# ---------------------------------------------------------------- the loss

def student_loss(logits, labels, teacher_probs, alpha: float, temperature: float):
    """(loss, ce, kd) of a batch. Labelled rows: alpha * CE(y, s) + (1 - alpha) * T^2 * KL(p_teacher^T ||
    softmax(s / T)); transfer rows (label -1) have no label and learn from the KD term alone.

    teacher_probs are the teachers' softened (and averaged) distributions at T; None means plain CE.
    Everything stays on the device (no host sync), so the step can be captured as a CUDA graph."""
    if teacher_probs is None:
        ce = F.cross_entropy(logits, labels)
        return ce, ce, torch.zeros_like(ce)
    labelled = labels >= 0
    ce_rows = F.cross_entropy(logits, labels.clamp(min=0), reduction="none") * labelled
    log_student = F.log_softmax(logits / temperature, dim=-1)
    kd_rows = temperature ** 2 * F.kl_div(log_student, teacher_probs, reduction="none").sum(-1)
    loss_rows = torch.where(labelled, alpha * ce_rows + (1 - alpha) * kd_rows, kd_rows)
    return loss_rows.mean(), ce_rows.sum() / labelled.sum().clamp(min=1), kd_rows.mean()


def soften(teacher_logits: list[torch.Tensor], weights, temperature: float) -> torch.Tensor:
    """Average of the teachers' softmax(logits / T), weighted; rows sum to 1."""
    w = torch.tensor(weights or [1.0] * len(teacher_logits), dtype=torch.float64)
    w = w / w.sum()
    probs = sum(wi * F.softmax(t.double() / temperature, dim=-1) for wi, t in zip(w, teacher_logits))
    return probs.float()


# ---------------------------------------------------------------- the rows

def transfer_rows(cfg, splits, tokenizer=None, log=print) -> rows_lib.Split | None:
    """Texts without labels for the teachers to label: the train rows data.labelled left out, the
    distill.unlabeled file (less any validation or test text), and distill.augment copies of each labelled text
    (of every text with augment_scope all); at most distill.max_transfer."""
    dc = cfg.distill
    rest = dc.rest_as_transfer and "unlabelled" in splits
    if not (dc.unlabeled or dc.augment or rest):
        return None
    if not dc.teachers:
        if dc.unlabeled or dc.augment:
            raise UserError("distill.unlabeled / distill.augment: transfer rows need distill.teachers to label them")
        log(f"data.labelled: the other {len(splits['unlabelled']):,} train rows are not used by this run (it has no "
            "distill.teachers to label them)")
        return None
    parts = []
    if rest:
        parts.append(splits["unlabelled"].texts)
    if dc.unlabeled:
        # a held-out text among them would be trained on with the teachers' label: its score would flatter
        held = {t for name in ("validation", "test") if name in splits for t in splits[name].texts}
        texts = readers.read_unlabelled(dc.unlabeled, cfg.data.label_names).texts
        parts.append([t for t in texts if t not in held])
        if len(parts[-1]) < len(texts):
            log(f"distill.unlabeled: {len(texts) - len(parts[-1]):,} texts that are also validation or test texts "
                "left out")
    if dc.augment:  # with few labels the unlabelled texts are most of the text there is: scope all copies them too
        mask = getattr(tokenizer, "mask_token", None) or "[MASK]"
        source = splits["train"].texts + ([t for p in parts for t in p] if dc.augment_scope == "all" else [])
        parts.append(data_lib.augment(source, dc.augment, dc.augment_ops, cfg.train.seed, mask))
    texts = [t for p in parts for t in p]
    if dc.max_transfer and len(texts) > dc.max_transfer:
        keep = np.sort(np.random.default_rng([cfg.train.seed, 3]).permutation(len(texts))[: dc.max_transfer])
        texts = [texts[i] for i in keep]
    return rows_lib.Split(texts, None)


def student_rows(cfg, splits, device, log, tokenizer=None):
    """(rows, soft targets or None) the student trains on: the labelled train split, then the transfer rows
    (label -1, or the teachers' argmax with transfer_targets: hard)."""
    train = splits["train"]
    transfer = transfer_rows(cfg, splits, tokenizer, log)
    if not cfg.distill.teachers:
        return train, None
    parts = [train] + ([transfer] if transfer is not None else [])
    probs = soft_targets(cfg, parts, device, log)
    if transfer is None:
        return train, probs
    labels = np.full(len(transfer), -1, dtype=np.int64)
    if cfg.distill.transfer_targets == "hard":  # self-training: the teachers' labels, as if given
        labels = probs[len(train):].argmax(-1).cpu().numpy()
    log(f"transfer rows: {len(transfer):,} ({cfg.distill.transfer_targets} targets) beside {len(train):,} labelled")
    return rows_lib.Split(train.texts + transfer.texts, np.concatenate([train.labels, labels])), probs


# ---------------------------------------------------------------- teachers' logits

def soft_targets(cfg, parts: list[rows_lib.Split], device, log) -> torch.Tensor:
    """Averaged softened teacher distributions over the rows of `parts`, in order, on the device."""
    all_logits = []
    for t in cfg.distill.teachers:
        logits = torch.cat(teacher_logits(t, cfg, parts, device, log))
        if logits.shape[1] != len(cfg.data.label_names):
            raise UserError(f"{t}: teacher has {logits.shape[1]} classes, the student {len(cfg.data.label_names)}")
        all_logits.append(logits)
    return soften(all_logits, list(cfg.distill.weights), cfg.distill.temperature).to(device)


def teacher_logits(teacher_dir, cfg, parts, device, log) -> list[torch.Tensor]:
    """One teacher's logits over each part, each from its cache or computed once and cached."""
    t_cfg, t_info = load_teacher(teacher_dir, cfg)
    teacher = None
    out = []
    for part in parts:
        data_key = data_lib.fingerprint(part, f"{t_cfg.model.backbone}|{t_cfg.data.max_length}")

        def compute():
            nonlocal teacher
            teacher = teacher or open_loaded(teacher_dir, t_cfg, t_info, device)  # once, only when a cache misses
            return teacher.logits(part.texts, t_cfg.train.eval_batch_size, "teacher logits")

        t0 = time.time()
        logits, hit = cached_teacher_logits(teacher_dir, data_key, compute)
        log(f"teacher {teacher_dir}: logits of {len(part):,} rows {'from cache' if hit else 'computed and cached'} "
            f"({time.time() - t0:.1f}s)")
        out.append(logits)
    return out
