"""Predict: a finished run's labels for unlabelled texts (CSV, JSONL, pickle), written as ID,Label."""
from __future__ import annotations

import csv
import io
import time
import warnings


from . import atomic
from . import data as data_lib
from . import model as model_lib
from .model import amp_dtype, pick_device
from .errors import UserError
from .evaluate import logits_for
from .runs import load_run, open_trained

LABEL_FORMATS = ("index", "name", "charcnn")  # 0..K-1 | class name | 1..K


def merged(model):
    """Fold LoRA into the frozen weights for inference: the same function with plain Linear layers."""
    if hasattr(model, "merge_and_unload"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model.merge_and_unload()
    return model


def predict(run_dir, input_path, out_path, device="auto", batch_size=None, label_format="index",
            backbone=None, log=print) -> dict:
    if label_format not in LABEL_FORMATS:
        raise UserError(f"--labels {label_format!r}: expected one of {', '.join(LABEL_FORMATS)}")
    # the input is read from the run's config alone, before the backbone loads: a bad file fails in a moment
    split = data_lib.read_unlabelled(input_path, load_run(run_dir)[0].data.label_names)
    dev = pick_device(device)
    cfg, _, model, tok = open_trained(run_dir, dev, backbone)
    amp = amp_dtype(cfg.train.precision, dev)
    model = merged(model)
    if amp is not None:
        model_lib.freeze_to(model, amp)
    t0 = time.perf_counter()
    store = data_lib.TokenStore(data_lib.encode(tok, split.texts, cfg.data.max_length), None,
                                tok.pad_token_id or 0, dev)
    logits = logits_for(model, store, batch_size or cfg.train.eval_batch_size, amp)
    seconds = time.perf_counter() - t0
    pred = logits.argmax(-1).tolist()
    names = cfg.data.label_names
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["ID", "Label"])
    for i, p in zip(split.ids, pred):
        w.writerow([i, {"index": p, "name": names[p], "charcnn": p + 1}[label_format]])
    atomic.write_text(out_path, buf.getvalue())
    stats = {"n": len(split), "seconds": seconds, "texts_per_s": len(split) / max(seconds, 1e-9),
             "device": str(dev)}
    log(f"wrote {len(split):,} predictions to {out_path} ({stats['texts_per_s']:.0f} texts/s on {dev})")
    return stats


