"""Multi-GPU benchmark: `lorakd train` under torchrun on 1 and on N GPUs, same config, same global batch.

Run on a host with several GPUs (one call), from the repo root:
    python bench/multi_gpu.py --backbone .device-carry/minilm --data .device-carry/data --gpus 2
Prints a table and writes bench/results/multi-gpu-<device>-x<N>-<date>.json. Rows:
  accuracy   the reference recipe on the sample (3 epochs, batch 24) on 1 and N GPUs: validation accuracy
  minilm     one epoch of the sample repeated to 120,000 rows, global batch 24 and 192 (--minilm-batches)
  roberta    roberta-base shapes with random weights (speed only), global batch 24 and 96
Throughput is `samples_per_s` from the run's summary: training steps only, graph capture included.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench import FULL_SPLIT, make_roberta, print_table, reference  # noqa: E402

from lorakd import atomic  # noqa: E402
from lorakd import config as config_lib  # noqa: E402
from lorakd import data as data_lib  # noqa: E402
from lorakd import model as model_lib  # noqa: E402

# NVLink multicast stays off on shared hosts (see the device notes); children inherit these.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def torchrun(cfg, gpus, out_dir, log_path, timeout=150):
    """One `lorakd train` under torchrun; returns the run's summary, or the error's last lines."""
    cfg_file = out_dir.with_suffix(".yaml")
    cfg_file.write_text(config_lib.to_yaml(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "-m", "lorakd.cli", "train", "--config", str(cfg_file), "--out", str(out_dir)]
    env = dict(os.environ, **SAFE_ENV, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="4")
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        try:  # a hung collective must not eat the whole lease
            proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout}s", "tail": Path(log_path).read_text().splitlines()[-15:]}
    if proc.returncode != 0:
        tail = Path(log_path).read_text().splitlines()[-15:]
        return {"error": f"exit {proc.returncode}", "tail": tail}
    return json.loads((out_dir / "run.json").read_text())["summary"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="embedded:minilm")
    ap.add_argument("--data", default="../shared/data/ag_news")
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--only", default="accuracy,minilm,roberta")
    ap.add_argument("--roberta-steps", type=int, default=400)
    ap.add_argument("--minilm-batches", type=int, nargs="+", default=[24, 192])
    ap.add_argument("--roberta-batches", type=int, nargs="+", default=[24, 96])
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="config overrides (smoke tests)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="lorakd-mgpu-"))
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"device": dev, "gpus": args.gpus, "date": date.today().isoformat(), "torch": torch.__version__,
              "launcher": "torchrun --standalone", "rows": []}
    out_path = ROOT / args.out / f"multi-gpu-{dev.replace(' ', '_')}-x{args.gpus}-{result['date']}.json"
    log_path = ROOT / args.out / f"multi-gpu-{dev.replace(' ', '_')}-x{args.gpus}-{result['date']}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    ref = config_lib.override(reference(args.backbone, args.data),
                              **dict(config_lib.parse_override(o) for o in args.set))
    repeat = math.ceil(FULL_SPLIT / len(data_lib.load_splits(ref.data, 42)["train"]))

    graphs_ok = [True]

    def measure(label, cfg, counts=(1, args.gpus)):
        by_n = {}
        for n in counts:
            run_cfg = cfg if n == 1 or graphs_ok[0] else config_lib.override(cfg, **{"train.cuda_graphs": "off"})
            run = tmp / f"{label.replace(' ', '_')}-{n}gpu"
            s = torchrun(run_cfg, n, run, log_path)
            if "error" in s and n > 1 and graphs_ok[0]:  # keep measuring: the eager step, said so in the row
                print(f"{label} on {n} GPUs failed with CUDA graphs; the rest run eager", flush=True)
                graphs_ok[0] = False
                run_cfg = config_lib.override(cfg, **{"train.cuda_graphs": "off"})
                s = torchrun(run_cfg, n, tmp / f"{run.name}-eager", log_path)
            by_n[n] = s
            r = {"name": label, "gpus": n, "global_batch": cfg.train.batch_size, "cuda_graphs": run_cfg.train.cuda_graphs}
            if "error" in s:
                r["error"] = s["error"]
                print(f"{label} on {n} GPU(s) failed:\n" + "\n".join(s["tail"]), flush=True)
            else:
                samples = s["samples_per_s"] * s["train_time_s"]
                capture = s.get("graph_capture_s", 0.0)
                r.update(samples_per_s=round(s["samples_per_s"], 1), train_time_s=s["train_time_s"],
                         graph_capture_s=capture,
                         steady_samples_per_s=round(samples / max(s["train_time_s"] - capture, 1e-9), 1),
                         steps=s["steps"], val_acc=round(s.get("validation_accuracy", float("nan")), 4),
                         world_size=s["world_size"])
            result["rows"].append(r)
            atomic.write_json(out_path, result)
        one, many = by_n.get(1, {}), by_n.get(args.gpus, {})
        if "samples_per_s" in one and "samples_per_s" in many:
            result["rows"][-1]["scaling"] = round(many["samples_per_s"] / one["samples_per_s"], 2)
            steady = [result["rows"][-i].get("steady_samples_per_s") for i in (1, 2)]
            if all(steady) and one.get("graph_capture_s") is not None:
                result["rows"][-1]["steady_scaling"] = round(steady[0] / steady[1], 2)
            atomic.write_json(out_path, result)

    if "accuracy" in only:
        measure("minilm ref recipe (sample, 3 ep)", ref)
    if "minilm" in only:
        for batch in args.minilm_batches:
            cfg = config_lib.override(ref, **{"data.repeat": repeat, "train.batch_size": batch,
                                              "train.max_steps": ref.train.max_steps or FULL_SPLIT // batch, "train.lr": 2e-4 * batch / 24})
            measure(f"minilm 120k 1 epoch b{batch}", cfg)
    if "roberta" in only:
        rb = make_roberta(tmp, model_lib.resolve_backbone(args.backbone))
        for batch in args.roberta_batches:
            cfg = config_lib.override(ref, **{"model.backbone": rb, "model.budget": 0, "data.repeat": repeat,
                                              "train.batch_size": batch,
                                              "train.max_steps": ref.train.max_steps or args.roberta_steps})
            measure(f"roberta-base shapes b{batch} ({args.roberta_steps} steps)", cfg)
    cols = ["name", "gpus", "global_batch", "cuda_graphs", "samples_per_s", "scaling", "steady_samples_per_s",
            "steady_scaling", "graph_capture_s", "val_acc", "steps", "train_time_s", "error"]
    print_table(result["rows"], cols)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
