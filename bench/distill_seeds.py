"""Does distillation help, beyond seed noise? The pipeline preset over several seeds, one GPU call:
    python bench/distill_seeds.py --backbone .device-carry/minilm --data .device-carry/data --seeds 42,43,44,45,46
Per seed (its own train/validation split, shared by all three runs): the full-FT teacher, the student
without distillation (cross-entropy only) and the distilled student (alpha 0.5, T 2), all in this process.
Prints a table and writes bench/results/distill-seeds.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench import print_table  # noqa: E402
from result_files import result_paths, write_result  # noqa: E402

from lorakd.pipeline import run_pipeline, split_configs  # noqa: E402
from lorakd.train import train  # noqa: E402
from lorakd.yaml_files import preset_path, read_yaml  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="embedded:minilm")
    ap.add_argument("--data", default="../shared/data/ag_news")
    ap.add_argument("--config", default="pipeline-minilm")
    ap.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[42, 43, 44, 45, 46])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides (smoke tests)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lorakd-kd-"))
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"device": dev, "date": date.today().isoformat(), "torch": torch.__version__, "config": args.config,
              "rows": []}
    out_paths = result_paths("distill-seeds", args.out, dev)
    quiet = lambda *a, **k: None  # noqa: E731
    args.config = str(preset_path(args.config))  # a file or a preset name
    raw = read_yaml(args.config)
    for seed in args.seeds:
        over = [f"model.backbone={args.backbone}", f"train.seed={seed}", *args.set]
        _, ce_cfg = split_configs(raw, over, args.data)  # no teacher: CE only
        ce = train(ce_cfg, tmp / f"ce-{seed}", log=quiet)
        kd = run_pipeline(args.config, over, out=tmp / f"kd-{seed}", data=args.data, log=quiet)
        row = {"seed": seed, "teacher": kd["teacher_summary"]["validation_accuracy"],
               "student_ce": ce["validation_accuracy"], "student_kd": kd["student_summary"]["validation_accuracy"]}
        row["kd_gain_pt"] = round(100 * (row["student_kd"] - row["student_ce"]), 2)
        result["rows"].append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        print(result["rows"][-1], flush=True)
        write_result(out_paths, result)
    gains = [r["kd_gain_pt"] for r in result["rows"]]
    result["summary"] = {k: round(statistics.mean(r[k] for r in result["rows"]), 4)
                         for k in ("teacher", "student_ce", "student_kd")}
    result["summary"].update(kd_gain_pt_mean=round(statistics.mean(gains), 2),
                             kd_gain_pt_stdev=round(statistics.stdev(gains), 2) if len(gains) > 1 else None,
                             seeds_kd_better=sum(g > 0 for g in gains), seeds_kd_worse=sum(g < 0 for g in gains))
    write_result(out_paths, result)
    print_table(result["rows"], ["seed", "teacher", "student_ce", "student_kd", "kd_gain_pt"])
    print(result["summary"])
    print(f"wrote {out_paths[0]}")


if __name__ == "__main__":
    main()
