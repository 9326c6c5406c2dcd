"""What the first seconds of `lorakd train` cost on a GPU, and what starting the CUDA context in the background
(graphs.start_device) saves. Each arm is a fresh process that times, from its own start: import torch, the
CUDA context (one allocation), the backbone's build with adapters (transformers and peft imported on first use),
the move to the device; `sequential` creates the context first, `overlapped` creates it in a thread while the
main thread builds (what train.setup does):

    python bench/cuda_start.py --backbone .device-carry/minilm [--repeats 2]

Prints a table; writes bench/results/cuda-start.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from lorakd import config as config_lib, graphs, model as model_lib
from lorakd.yaml_files import preset_path
t_import = time.perf_counter()
device = torch.device("cuda:0")
cfg = config_lib.load(preset_path("agnews-minilm"), [f"model.backbone={sys.argv[2]}"])
thread = None
if sys.argv[1] == "sequential":
    torch.empty(1, device=device)
else:
    thread = graphs.start_device(device)
t_context = time.perf_counter()
model = model_lib.build(cfg.model, 4)
t_build = time.perf_counter()
if thread is not None:
    thread.join()
model.to(device)
torch.cuda.synchronize()
t_device = time.perf_counter()
print(json.dumps({"import_s": t_import - t0, "context_s": t_context - t_import, "build_s": t_build - t_context,
                  "to_device_s": t_device - t_build, "total_s": t_device - t0}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="embedded:minilm")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    import torch

    dev = torch.cuda.get_device_name()
    rows = {"sequential": [], "overlapped": []}
    for _ in range(args.repeats):  # alternated, so neither arm always runs on a warmer page cache
        for arm in rows:
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD, arm, args.backbone], cwd=ROOT, check=True,
                                 capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            r["process_s"] = time.perf_counter() - t
            rows[arm].append({k: round(v, 3) for k, v in r.items()})
    result = {"device": dev, "date": date.today().isoformat(), "torch": torch.__version__,
              "backbone": args.backbone, "rows": rows,
              "best_total_s": {arm: min(r["total_s"] for r in v) for arm, v in rows.items()}}
    print(f"{'arm':<11} {'import':>7} {'context':>8} {'build':>7} {'to dev':>7} {'total':>7}")
    for arm, v in rows.items():
        for r in v:
            print(f"{arm:<11} {r['import_s']:7.2f} {r['context_s']:8.2f} {r['build_s']:7.2f} {r['to_device_s']:7.2f}"
                  f" {r['total_s']:7.2f}")
    from result_files import result_paths, write_result  # bench/ is sys.path[0] when run as a script

    paths = result_paths("cuda-start", args.out, dev)
    write_result(paths, result)
    print(f"wrote {paths[0]}")


if __name__ == "__main__":
    main()
