"""Does memory stay bounded as rows grow? (issue 30) The student's token ids on the GPU and the teacher's
logits streamed in chunks, for the 50,754-row file and that file repeated 10 times (507,540 rows), one GPU call:

    python bench/memory_scale.py --backbone DIR --data DIR [--repeats 1,10] [--out bench/results]

Per size: a short teacher (a MiniLM full fine-tune, 30 steps: only its logits' size matters), then a student
distilled from it over every row (its logits computed in inference.CHUNK-row chunks and kept as soft targets on the
GPU), 50 steps. Reports rows, the token-id store's bytes, the soft targets' bytes and the peak GPU memory of each
phase (torch.cuda.max_memory_allocated, reset per phase). Writes bench/results/memory-scale.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorakd import atomic, inference  # noqa: E402
from lorakd import data as data_lib  # noqa: E402
from lorakd import config as config_lib  # noqa: E402
from lorakd.train import train  # noqa: E402


def peak_gb():
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None


def reset():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--repeats", default="1,10")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lorakd-mem-"))
    quiet = lambda *a, **k: None  # noqa: E731
    base = [f"data.path={args.data}", f"model.backbone={args.backbone}", "train.eval_every=0", *args.set]
    teacher = tmp / "teacher"
    reset()
    train(config_lib.load(None, base + ["role=teacher", "model.full_finetune=true", "train.max_steps=30",
                                        "data.max_train_samples=2000"]), teacher, log=quiet)
    rows = []
    for repeat in (int(r) for r in args.repeats.split(",")):
        reset()
        t0 = time.time()
        cfg = config_lib.load(None, base + [f"data.repeat={repeat}", f"distill.teachers=[{teacher}]",
                                            "train.max_steps=50"])
        s = train(cfg, tmp / f"student-{repeat}", log=quiet)
        n = s["steps"]
        row = {"repeat": repeat, "train_rows": len(data_lib.load_splits(cfg.data, cfg.train.seed)["train"]),
               "peak_gpu_gb": peak_gb(), "wall_s": round(time.time() - t0, 1),
               "steps": n, "logit_chunk_rows": inference.CHUNK, "data_s": s["phases_s"].get("data")}
        rows.append(row)
        print(row, flush=True)
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "rows": rows,
              "note": "peak = torch.cuda.max_memory_allocated over the student's whole run (token ids of every "
                      "row, soft targets, model, optimizer, activations), reset before each size"}
    atomic.write_json(Path(args.out) / "memory-scale.json", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
