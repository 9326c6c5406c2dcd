"""Evaluate: logits in large length-sorted batches, then accuracy, macro-F1, per-class scores, confusion."""
from __future__ import annotations

import numpy as np
import torch

from .graphs import autocast


def progress_bar(total: int, desc: str):
    """A bar over `total` rows for an evaluation or a teacher's pass, as the training bar: on rank 0 and on a
    terminal only. It leaves no line behind, so the metric lines after it stand alone."""
    from tqdm import tqdm

    from . import dist

    return tqdm(total=total, desc=desc, unit="rows", leave=False, dynamic_ncols=True, mininterval=1.0,
                disable=dist.env()[0] != 0 or None)


@torch.inference_mode()
def logits_for(model, store, batch_size, amp_dtype=None, indices=None, bar=None) -> torch.Tensor:
    """float32 logits [N, C] on the CPU, batches sorted by length so little is padded; `bar` (progress_bar)
    counts the rows."""
    idx_all = np.arange(len(store)) if indices is None else np.asarray(indices)
    order = idx_all[np.argsort(-store.lengths_np[idx_all], kind="stable")]
    device = store.ids.device
    was_training = model.training
    model.eval()
    out = torch.empty(len(idx_all), model.config.num_labels if hasattr(model, "config") else 0)
    pos = {int(i): k for k, i in enumerate(idx_all)}
    chunks = []
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        ids, mask = store.batch(torch.as_tensor(idx, device=device), store.width(idx))
        with autocast(device, amp_dtype):
            chunks.append((idx, model(input_ids=ids, attention_mask=mask).logits.float()))
        if bar is not None:
            bar.update(len(idx))
    for idx, logits in chunks:
        out[[pos[int(i)] for i in idx]] = logits.cpu()
    model.train(was_training)
    return out


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
    from pathlib import Path

    from . import atomic
    from . import data as data_lib
    from .errors import UserError
    from .runs import open_trained, read_eval
    from .graphs import amp_dtype, pick_device

    dev = pick_device(device, key="--device")
    cfg, _, model, tok = open_trained(run_dir, dev, backbone)
    splits = data_lib.load_splits(cfg.data, cfg.train.seed)
    if split not in splits:
        raise UserError(f"--split {split}: this run's data ({cfg.data.path}) has no {split} split")
    if not len(splits[split]):
        raise UserError(f"--split {split}: this run's {split} split is empty (data.val_fraction="
                        f"{cfg.data.val_fraction})")
    s = splits[split]
    store = data_lib.TokenStore(data_lib.encode(tok, s.texts, cfg.data.max_length), s.labels,
                                tok.pad_token_id or 0, dev)
    with progress_bar(len(store), split) as bar:
        logits = logits_for(model, store, cfg.train.eval_batch_size, amp_dtype(cfg.train.precision, dev), bar=bar)
    m = metrics(logits, s.labels, cfg.data.label_names)
    log(format_table(split, m))
    path = Path(run_dir) / "eval.json"
    results = read_eval(run_dir)
    results[split] = m
    atomic.write_json(path, results)
    return m


from . import callable_module  # noqa: E402

callable_module(__name__)  # lorakd.evaluate(...) runs the API call lorakd.api.evaluate (lorakd/__init__.py)
