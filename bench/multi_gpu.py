"""Multi-GPU benchmark: `lorakd train` under torchrun on 1 and on N GPUs.

Run on a host with several GPUs (one call), from the repo root:
    python bench/multi_gpu.py --backbone .device-carry/minilm --data .device-carry/data --gpus 2
Prints a table and writes bench/results/multi-gpu[-curve][TAG].json (and a timestamped copy with its log in bench/results/scratch/). Sections (--only):
  accuracy   the reference recipe on the sample (3 epochs, batch 24) on 1 and N GPUs: validation accuracy
  minilm     strong scaling: one epoch of the sample repeated to 120,000 rows at the same global batch
             (--minilm-batches) on 1 and N GPUs
  roberta    strong scaling on roberta-base shapes with random weights (speed only), --roberta-batches
  weak       weak scaling: the per-GPU batch kept (--weak-batches), so N GPUs train a global batch N times
             larger over the same 120,000 samples (MiniLM and roberta-base shapes)
  sweep      `lorakd sweep --gpus 1` against `--gpus N` on an 8-member rank sweep (the reference recipe on the
             sample): wall time, command to exit
  curve      one GPU only, in this process: steady step time against batch size, and from it the most
             that splitting a global batch B over N GPUs can give, t(B) / t(B/N) (needs no second GPU)
Throughput is `samples_per_s` from the run's summary (training steps only, graph capture included);
`steady_samples_per_s` leaves the capture out (`graph_capture_s`), as a long run would.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench import FULL_SPLIT, make_roberta, print_table, reference  # noqa: E402

from result_files import result_paths, write_result  # noqa: E402
from lorakd import config as config_lib  # noqa: E402
from lorakd import data as data_lib  # noqa: E402
from lorakd import backbones  # noqa: E402

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


def steady(s):
    """Samples/s without the one-off CUDA-graph captures."""
    samples = s["samples_per_s"] * s["train_time_s"]
    return samples / max(s["train_time_s"] - s.get("graph_capture_s", 0.0), 1e-9)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="embedded:minilm")
    ap.add_argument("--data", default="../shared/data/ag_news")
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--only", default="accuracy,minilm,weak,roberta,sweep")
    ap.add_argument("--roberta-steps", type=int, default=400)
    ap.add_argument("--minilm-batches", type=int, nargs="+", default=[24, 192])
    ap.add_argument("--roberta-batches", type=int, nargs="+", default=[24, 96])
    ap.add_argument("--weak-batches", type=int, nargs="+", default=[24, 96], help="per-GPU batches")
    ap.add_argument("--curve-batches", type=int, nargs="+", default=[6, 12, 24, 48, 96, 192, 384])
    ap.add_argument("--curve-steps", type=int, default=400)
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="config overrides (smoke tests)")
    ap.add_argument("--tag", default="", help="suffix of the result and log files (a later call adds rows apart)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="lorakd-mgpu-"))
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"device": dev, "gpus": args.gpus, "date": date.today().isoformat(), "torch": torch.__version__,
              "launcher": "torchrun --standalone", "rows": [], "curve": []}
    part = "-curve" if only == {"curve"} else ""  # the one-GPU curve is its own result file
    out_paths = result_paths(f"multi-gpu{part}{args.tag}", args.out, f"{dev}-x{args.gpus}")
    out_path, log_path = out_paths[0], out_paths[1].with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if only - {"curve"}:  # the curve runs in this process and logs nothing
        log_path.write_text("")
    ref = config_lib.override(reference(args.backbone, args.data),
                              **dict(config_lib.parse_override(o) for o in args.set))
    repeat = math.ceil(FULL_SPLIT / len(data_lib.load_splits(ref.data, 42)["train"]))
    roberta = [None]

    def roberta_cfg():
        """ref on roberta-base shapes (random weights, made once; speed only, so no budget)."""
        if roberta[0] is None:
            folder = make_roberta(tmp, backbones.resolve_backbone(args.backbone))
            roberta[0] = config_lib.override(ref, **{"model.backbone": folder, "model.budget": 0})
        return roberta[0]

    def at_scale(cfg, batch, steps=None):
        """cfg on the 120k-row data at this global batch (lr scaled with it), `steps` or one epoch."""
        return config_lib.override(cfg, **{"data.repeat": repeat, "train.batch_size": batch,
                                           "train.lr": cfg.train.lr * batch / cfg.train.batch_size,
                                           "train.max_steps": ref.train.max_steps or steps or FULL_SPLIT // batch})

    graphs_ok = [True]

    def measure(label, cfgs, kind):
        """cfgs: {process count: config}; one row each, scaling on the last row."""
        by_n = {}
        for n, cfg in cfgs.items():
            run_cfg = cfg if n == 1 or graphs_ok[0] else config_lib.override(cfg, **{"train.cuda_graphs": "off"})
            run = tmp / f"{label.replace(' ', '_')}-{n}gpu"
            s = torchrun(run_cfg, n, run, log_path)
            if "error" in s and n > 1 and graphs_ok[0]:  # keep measuring: the eager step, said so in the row
                print(f"{label} on {n} GPUs failed with CUDA graphs; the rest run eager", flush=True)
                graphs_ok[0] = False
                run_cfg = config_lib.override(cfg, **{"train.cuda_graphs": "off"})
                s = torchrun(run_cfg, n, tmp / f"{run.name}-eager", log_path)
            by_n[n] = s
            r = {"name": label, "scaling_kind": kind, "gpus": n, "global_batch": cfg.train.batch_size,
                 "per_gpu_batch": cfg.train.batch_size // n, "cuda_graphs": run_cfg.train.cuda_graphs}
            if "error" in s:
                r["error"] = s["error"]
                print(f"{label} on {n} GPU(s) failed:\n" + "\n".join(s["tail"]), flush=True)
            else:
                r.update(samples_per_s=round(s["samples_per_s"], 1), train_time_s=s["train_time_s"],
                         graph_capture_s=s.get("graph_capture_s", 0.0), steady_samples_per_s=round(steady(s), 1),
                         steps=s["steps"], val_acc=round(s.get("validation_accuracy", float("nan")), 4),
                         world_size=s["world_size"])
            result["rows"].append(r)
            write_result(out_paths, result)
        one, many = by_n.get(1, {}), by_n.get(args.gpus, {})
        if args.gpus > 1 and "samples_per_s" in one and "samples_per_s" in many:
            result["rows"][-1]["scaling"] = round(many["samples_per_s"] / one["samples_per_s"], 2)
            result["rows"][-1]["steady_scaling"] = round(steady(many) / steady(one), 2)
            write_result(out_paths, result)

    both = (1, args.gpus)
    if "accuracy" in only:
        measure("minilm ref recipe (sample, 3 ep)", {n: ref for n in both}, "strong")
    if "minilm" in only:
        for batch in args.minilm_batches:
            cfg = at_scale(ref, batch)
            measure(f"minilm 120k 1 epoch b{batch}", {n: cfg for n in both}, "strong")
    if "weak" in only:
        for per_gpu in args.weak_batches:
            measure(f"minilm 120k 1 epoch, b{per_gpu} per GPU", {n: at_scale(ref, per_gpu * n) for n in both}, "weak")
        rb = roberta_cfg()
        per_gpu, samples = args.weak_batches[0], args.roberta_steps * args.weak_batches[0]
        measure(f"roberta-base shapes, b{per_gpu} per GPU ({samples} samples)",
                {n: at_scale(rb, per_gpu * n, samples // (per_gpu * n)) for n in both}, "weak")
    if "roberta" in only:
        rb = roberta_cfg()
        for batch in args.roberta_batches:
            cfg = at_scale(rb, batch, args.roberta_steps)
            measure(f"roberta-base shapes b{batch} ({args.roberta_steps} steps)", {n: cfg for n in both}, "strong")
    if "sweep" in only and args.gpus > 1:
        sweep_file = tmp / "ranks.yaml"
        sweep_file.write_text("name: ranks\nbase: agnews-minilm\n"
                              "grid:\n  model.r: [1, 2, 3, 4, 5, 6, 7, 8]\n")
        sets = [f"model.backbone={args.backbone}"] + args.set
        for n in both:
            cmd = [sys.executable, "-m", "lorakd.cli", "sweep", str(sweep_file), "--data", args.data,
                   "--gpus", str(n), "--out", str(tmp / f"sweep-{n}gpu"), "--set", *sets]
            t0 = time.perf_counter()
            with open(log_path, "a") as log:
                log.write(f"\n$ {' '.join(cmd)}\n")
                log.flush()
                rc = subprocess.run(cmd, env=dict(os.environ, **SAFE_ENV), stdout=log, stderr=subprocess.STDOUT,
                                    cwd=ROOT, timeout=300).returncode
            wall = time.perf_counter() - t0
            r = {"name": "sweep of 8 members (r 1-8), wall", "scaling_kind": "sweep", "gpus": n,
                 "global_batch": ref.train.batch_size, "per_gpu_batch": ref.train.batch_size, "wall_s": round(wall, 1)}
            if rc:
                r["error"] = f"exit {rc}"
            result["rows"].append(r)
        one, many = result["rows"][-2], result["rows"][-1]
        if "error" not in one and "error" not in many:
            many["scaling"] = round(one["wall_s"] / many["wall_s"], 2)
        write_result(out_paths, result)
    if "curve" in only:
        curve(args, ref, at_scale, roberta_cfg, tmp, result, out_paths)
    cols = ["name", "scaling_kind", "gpus", "global_batch", "cuda_graphs", "samples_per_s", "scaling",
            "steady_samples_per_s", "steady_scaling", "graph_capture_s", "wall_s", "val_acc", "steps", "error"]
    if result["rows"]:
        print_table(result["rows"], cols)
    if result["curve"]:
        ceilings = sorted({k for r in result["curve"] for k in r if k.startswith("ceiling_")})
        print_table(result["curve"], ["backbone", "batch", "steady_samples_per_s", "step_ms", *ceilings,
                                      "graph_capture_s", "steps"])
    print(f"wrote {out_path}")


def curve(args, ref, at_scale, roberta_cfg, tmp, result, out_paths):
    """Steady step time against batch size on one GPU (in this process). Splitting a global batch B over
    N GPUs runs steps of B/N per GPU, so N-GPU throughput is at most t(B) / t(B/N) times one GPU's."""
    from lorakd.train import train

    counts = sorted({2, max(args.gpus, 2)})
    for name, cfg in (("minilm", ref), ("roberta-base shapes", roberta_cfg())):
        times = {}
        for batch in args.curve_batches:
            run_cfg = at_scale(cfg, batch, args.curve_steps)
            s = train(run_cfg, Path(tempfile.mkdtemp(dir=tmp)), log=lambda *a: None)
            rate = steady(s)
            times[batch] = batch / rate
            result["curve"].append({"backbone": name, "batch": batch, "steady_samples_per_s": round(rate, 1),
                                    "step_ms": round(1000 * times[batch], 3), "steps": s["steps"],
                                    "graph_capture_s": s.get("graph_capture_s", 0.0)})
            for k in counts:
                if batch % k == 0 and batch // k in times:
                    result["curve"][-1][f"ceiling_x{k}"] = round(times[batch] / times[batch // k], 2)
            write_result(out_paths, result)
            print(result["curve"][-1], flush=True)


if __name__ == "__main__":
    main()
