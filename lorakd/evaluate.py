"""Evaluate: a run's logits over its validation or test split, then accuracy, macro-F1, per-class scores,
confusion."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import atomic
from . import data as data_lib
from .errors import UserError
from .graphs import pick_device
from .inference import open_run
from .runs import read_eval


def metrics(logits: torch.Tensor, labels, names) -> dict:
    """Everything eval.json holds, from logits and true labels."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    k = len(names)
    loss = torch.nn.functional.cross_entropy(logits.float(), labels).item()
    pred = logits.argmax(-1)
    confusion = torch.zeros(k, k, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    tp = confusion.diag().double()
    precision = (tp / confusion.sum(0).clamp(min=1)).tolist()
    recall = (tp / confusion.sum(1).clamp(min=1)).tolist()
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall)]
    return {
        "n": len(labels),
        "loss": loss,
        "accuracy": (pred == labels).double().mean().item(),
        "macro_f1": float(np.mean(f1)),
        "per_class": {n: {"precision": p, "recall": r, "f1": f, "support": int(s)}
                      for n, p, r, f, s in zip(names, precision, recall, f1, confusion.sum(1).tolist())},
        "confusion": confusion.tolist(),
        "labels": list(names),
    }


def format_table(split: str, m: dict) -> str:
    names = m["labels"]
    w = max(10, *(len(n) for n in names))
    lines = [f"{split}: accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  loss {m['loss']:.4f}  (n={m['n']:,})",
             f"{'class':<{w}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}   confusion (rows: true)"]
    for n, row in zip(names, m["confusion"]):
        c = m["per_class"][n]
        lines.append(f"{n:<{w}} {c['precision']:>9.4f} {c['recall']:>9.4f} {c['f1']:>9.4f} {c['support']:>8}   "
                     + " ".join(f"{v:>6}" for v in row))
    return "\n".join(lines)


def evaluate_run(run_dir, split="validation", device="auto", backbone=None, log=print) -> dict:
    """Re-evaluate a finished run on its validation or test split; updates eval.json atomically."""
    dev = pick_device(device, key="--device")
    trained = open_run(run_dir, dev, backbone)
    cfg = trained.cfg
    splits = data_lib.load_splits(cfg.data, cfg.train.seed)
    if split not in splits:
        raise UserError(f"--split {split}: this run's data ({cfg.data.path}) has no {split} split")
    if not len(splits[split]):
        raise UserError(f"--split {split}: this run's {split} split is empty (data.val_fraction="
                        f"{cfg.data.val_fraction})")
    s = splits[split]
    m = metrics(trained.logits(s.texts, cfg.train.eval_batch_size, split), s.labels, cfg.data.label_names)
    log(format_table(split, m))
    path = Path(run_dir) / "eval.json"
    results = read_eval(run_dir)
    results[split] = m
    atomic.write_json(path, results)
    return m


from .package import callable_module  # noqa: E402

callable_module(__name__)  # lorakd.evaluate(...) runs the API call lorakd.api.evaluate (lorakd/package.py)
