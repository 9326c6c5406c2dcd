"""CPU prediction: PyTorch fp32 (a run folder, `lorakd predict`'s path) against ONNX fp32, ONNX int8, OpenVINO.
Trains nothing; give it a finished student run (the CPU demo's is enough):
    lorakd train --config agnews-minilm --data ../shared/data/ag_news train.max_steps=150 \
        train.lr=1e-3 train.eval_every=50 --out /tmp/minilm-student
    python bench/predict_cpu.py --run /tmp/minilm-student
Exports the run (lorakd export --onnx), predicts every text of --data with each model through lorakd's own
predict (in this process, after a warm-up; the models take turns for --repeat rounds and each keeps its fastest,
as the machine may be shared), then once more as a fresh `lorakd predict` process (all but ONNX fp32). With
OpenVINO installed, `--runtime openvino` on the export is a row too. Agreement is with the PyTorch labels,
accuracy against the file's labels. Prints a table and writes bench/results/predict-cpu.json.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lorakd import readers  # noqa: E402
from lorakd.export import export  # noqa: E402
from lorakd.predict import predict  # noqa: E402
from lorakd.runs import load_run  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_files import result_paths, write_result  # noqa: E402


def labels(path) -> np.ndarray:
    return np.asarray([int(r[1]) for r in list(csv.reader(open(path)))[1:]])


def fresh_cli(model, inp, out, runtime="onnxruntime") -> float:
    """Wall seconds of `lorakd predict` in a new process: imports, model load, prediction, output."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lorakd.cli", "predict", str(model), "--input", str(inp), "--out", str(out),
                    "--runtime", runtime], env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a finished MiniLM student run folder")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ag_news" / "train.csv"))
    ap.add_argument("--export", help="an existing `lorakd export --onnx` folder of the run (default: export now)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--no-fresh", action="store_true", help="skip the fresh-process CLI timings")
    ap.add_argument("--repeat", type=int, default=2, help="in-process runs per model; the fastest is kept")
    args = ap.parse_args()
    import onnxruntime
    import torch
    import transformers

    tmp = Path(tempfile.mkdtemp(prefix="lorakd-predict-cpu-"))
    cfg, _ = load_run(args.run)
    split = readers.read_file(args.data, cfg.data.label_names)
    inp = tmp / "unlabelled.csv"
    with open(inp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows(enumerate(split.texts))
    warm = tmp / "warm.csv"
    warm.write_text("".join(open(inp, encoding="utf-8").readlines()[:257]), encoding="utf-8")
    folder = Path(args.export) if args.export else tmp / "export"
    if not (folder / "model.int8.onnx").exists():
        t0 = time.perf_counter()
        export(args.run, folder, onnx=True)
        print(f"export: {time.perf_counter() - t0:.1f}s")
    # name: (what `lorakd predict` is given, runtime, the file whose size is reported)
    models = {"PyTorch fp32 (run folder)": (Path(args.run), "onnxruntime", folder / "model.safetensors"),
              "ONNX fp32": (folder / "model.onnx", "onnxruntime", folder / "model.onnx"),
              "ONNX int8": (folder / "model.int8.onnx", "onnxruntime", folder / "model.int8.onnx")}
    try:  # `lorakd predict --runtime openvino`: the fp32 graph, bf16 where the CPU has AMX
        import openvino
        models["OpenVINO (model.onnx)"] = (folder, "openvino", folder / "model.onnx")
    except ImportError:
        openvino = None
    quiet = lambda *a: None  # noqa: E731
    rows, ref = [], None
    for model, runtime, _ in models.values():  # warm-up: lazy imports, allocators, compiled graphs
        predict(model, warm, tmp / "w.csv", progress=False, log=quiet, runtime=runtime)
    # the machine is shared and drifts: the models take turns, --repeat rounds, each keeps its fastest run
    tries = {name: [] for name in models}
    for r in range(args.repeat):
        for i, (name, (model, runtime, _)) in enumerate(models.items()):
            load, out = os.getloadavg()[0], tmp / f"{i}-{r}.csv"
            tries[name].append((predict(model, inp, out, progress=False, log=quiet, runtime=runtime), load, out))
    for name, (model, runtime, file) in models.items():
        stats, load, out = max(tries[name], key=lambda t: t[0]["texts_per_s"])
        pred = labels(out)
        ref = pred if ref is None else ref
        row = {"model": name, "texts_per_s": round(stats["texts_per_s"], 1), "seconds": round(stats["seconds"], 2),
               "agreement": round(float((pred == ref).mean()), 5),
               "accuracy": round(float((pred == split.labels).mean()), 5), "mb": round(file.stat().st_size / 1e6, 1),
               "load_avg_before": round(load, 2), "runtime": stats["device"],
               "all_texts_per_s": [round(t[0]["texts_per_s"], 1) for t in tries[name]]}
        if not args.no_fresh and name != "ONNX fp32":
            row["fresh_cli_s"] = round(fresh_cli(model, inp, tmp / "fresh.csv", runtime), 1)
            assert (labels(tmp / "fresh.csv") == pred).all()
        rows.append(row)
        print(row, flush=True)
    base = rows[0]["texts_per_s"]
    for r in rows:
        r["speedup"] = round(r["texts_per_s"] / base, 2)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
               platform.machine())
    result = {"date": date.today().isoformat(), "cpu": cpu,
              "cpu_threads": os.cpu_count(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
              "openvino": openvino.__version__ if openvino else None,
              "transformers": transformers.__version__, "texts": len(split), "data": args.data, "run": str(args.run),
              "adapter_mb": round(sum(f.stat().st_size for f in (Path(args.run) / "adapter").iterdir()) / 1e6, 2),
              "note": "texts/s: reading, tokenising, predicting and writing all texts in one process, model "
                      "loaded and warmed up; fresh_cli_s: a new `lorakd predict` process, wall time",
              "rows": rows}
    paths = result_paths("predict-cpu", args.out)
    write_result(paths, result)
    out = paths[0]
    cols = ["model", "texts_per_s", "speedup", "agreement", "accuracy", "mb", "fresh_cli_s", "load_avg_before"]
    widths = [max(len(c), *(len(str(r.get(c, "-"))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "-")).ljust(w) for c, w in zip(cols, widths)))
    print(f"wrote {out}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
