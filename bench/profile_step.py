"""What bounds the training step: kernel time by kind, and the model FLOP utilisation that leaves.

For a backbone and a batch size (roberta-base shapes with random weights by default, the MFU case of issue 14):
the plain step under torch.profiler (device kernel time per step, grouped: matrix products, attention,
normalisation, element-wise, optimizer, copies), then the graphed step's own time per step, both after warm-up,
on the same length-grouped batches of the sample. Prints a table; writes bench/results/profile-step[TAG].json:

    python bench/profile_step.py --backbone roberta-base --data .device-carry/data --tokenizer .device-carry/minilm \
        --batches 256 24 [--steps N] [--set key=value ...] [--tag=-NAME] --out "$OUT"

On a CPU it runs the same (operator time instead of kernel time): a smoke test.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (reference recipe, random roberta-base shapes, FLOPs per sample, peak FLOP/s)
from result_files import result_paths, write_result  # noqa: E402

from lorakd import config as config_lib  # noqa: E402
from lorakd import train as train_lib  # noqa: E402
from lorakd import train_setup  # noqa: E402

KINDS = [  # (kind, pattern over kernel or operator names), first match wins
    ("fused by inductor (train.compile)", r"^triton_"),
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("matrix products", r"gemm|cutlass|nvjet|xmma|cublas|aten::(mm|addmm|bmm|matmul|linear)"),
    ("normalisation", r"layer_?norm"),
    ("optimizer", r"multi_tensor|foreach|adam"),
    ("copies and indexing", r"copy|memcpy|memset|index|gather|cat|embedding"),
    ("element-wise and reductions", r"elementwise|vectorized|unrolled|reduce|gelu|dropout|aten::"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, pattern in KINDS if re.search(pattern, low)), "other")


def profile_plain(run, batches, steps: int) -> dict:
    """Device (or CPU operator) time per step by kind over `steps` plain steps, after 3 warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    cuda = run.device.type == "cuda"
    for idx, rows in batches[:3]:
        run.step(idx, run.stores["train"].width(rows))
    sync(run.device)
    todo = batches[3: 3 + steps]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for idx, rows in todo:
            run.step(idx, run.stores["train"].width(rows))
        sync(run.device)
    wall = (time.perf_counter() - t0) / len(todo)
    by_kind: dict[str, float] = {}
    for ev in prof.key_averages():
        on_device = str(ev.device_type).endswith("CUDA")
        if cuda != on_device or (not cuda and not ev.key.startswith("aten::")):
            continue
        us = ev.self_device_time_total if cuda else ev.self_cpu_time_total
        by_kind[kind_of(ev.key)] = by_kind.get(kind_of(ev.key), 0.0) + us / 1000 / len(todo)
    busy = sum(by_kind.values())
    return {"wall_ms_per_step": round(1000 * wall, 3), "busy_ms_per_step": round(busy, 3),
            "ms_per_step_by_kind": {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}}


def time_steps(run, batches, steps: int) -> tuple[float, float]:
    """(ms per step, tokens per step) over `steps` steps, after every shape has been run (captured) once."""
    store = run.stores["train"]
    seen = set()
    for idx, rows in batches:  # capture (or warm) each shape first
        key = (len(rows), store.width(rows))
        if key not in seen:
            seen.add(key)
            run.step(idx, key[1], key)
    sync(run.device)
    todo = (batches * (1 + steps // max(1, len(batches))))[:steps]
    t0 = time.perf_counter()
    for idx, rows in todo:
        run.step(idx, store.width(rows), (len(rows), store.width(rows)))
    sync(run.device)
    tokens = sum(int(store.lengths_np[rows].sum()) for _, rows in todo) / len(todo)
    return 1000 * (time.perf_counter() - t0) / len(todo), tokens


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="roberta-base",
                    help="a known backbone's shapes with random weights (roberta-base), or a model folder")
    ap.add_argument("--tokenizer", default="embedded:minilm", help="for random shapes: whose tokenizer (ids fit)")
    ap.add_argument("--data", default="../shared/data/ag_news")
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 24])
    ap.add_argument("--steps", type=int, default=20, help="profiled plain steps (and 5x that graphed)")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides of every run")
    ap.add_argument("--tag", default="", help="suffix of the JSON's name")
    ap.add_argument("--out", default=str(bench.REPO / "bench" / "results"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lorakd-profile-"))
    folder = args.backbone if Path(args.backbone).is_dir() else bench.make_roberta(tmp, bench.backbones.resolve_backbone(
        args.tokenizer), known=args.backbone)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = bench.peak_flops()
    res = {"device": dev, "date": date.today().isoformat(), "torch": torch.__version__, "backbone": args.backbone,
           "peak_flops": peak, "rows": []}
    for batch in args.batches:
        over = {"model.budget": 0, "train.batch_size": batch, "train.max_steps": 10_000, "train.eval_every": 10_000}
        cfg = config_lib.override(bench.reference(folder, args.data, **over), **dict(o.split("=", 1) for o in args.set))
        row = {"batch": batch}
        for mode in ("off", "auto"):
            run = train_setup.setup(config_lib.override(cfg, **{"train.cuda_graphs": mode}), tmp / f"b{batch}-{mode}",
                                  False, lambda *a, **k: None)
            batches = train_lib.epoch_batches(run, 0)
            if mode == "off":
                row["plain"] = profile_plain(run, batches, args.steps)
                store = run.stores["train"]
                picked = batches[3: 3 + args.steps]
                tokens = sum(int(store.lengths_np[rows].sum()) for _, rows in picked) / len(picked)
                row["tokens_per_step"] = round(tokens, 1)
            elif run.device.type == "cuda":
                ms, tokens = time_steps(run, batches, 5 * args.steps)
                row["graphed_ms_per_step"], row["graphed_tokens_per_step"] = round(ms, 3), round(tokens, 1)
            del run
        flops = {k: bench.flops_per_sample(folder, row[k] / batch) * batch
                 for k in ("tokens_per_step", "graphed_tokens_per_step") if k in row}
        # MFU of the step a run uses (graphed on a GPU), over the batches it was timed on
        step_ms, step_flops = ((row["graphed_ms_per_step"], flops["graphed_tokens_per_step"]) if "graphed_ms_per_step" in row
                               else (row["plain"]["wall_ms_per_step"], flops["tokens_per_step"]))
        row["mfu"] = round(step_flops / (step_ms / 1000) / peak, 4) if peak else None
        mm = row["plain"]["ms_per_step_by_kind"].get("matrix products")  # over the profiled batches
        row["matrix_product_tflops"] = round(flops["tokens_per_step"] / (mm / 1000) / 1e12, 1) if mm else None
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    for row in res["rows"]:
        p = row["plain"]
        print(f"\nbatch {row['batch']}: graphed {row.get('graphed_ms_per_step')} ms/step, plain {p['wall_ms_per_step']} "
              f"ms/step wall, {p['busy_ms_per_step']} ms busy; MFU {row['mfu']}; matrix products at "
              f"{row['matrix_product_tflops']} TFLOP/s of their own time")
        for kind, ms in p["ms_per_step_by_kind"].items():
            print(f"  {kind:<30} {ms:9.3f} ms  {100 * ms / p['busy_ms_per_step']:5.1f}%")
    paths = result_paths(f"profile-step{args.tag}", args.out, dev)
    write_result(paths, res)
    print(f"wrote {paths[0]}")


if __name__ == "__main__":
    main()
