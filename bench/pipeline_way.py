"""`lorakd pipeline` timed command to exit, as a user runs it: bench/trainer_way.py's peer (issue 30).

    python bench/pipeline_way.py --teacher-backbone DIR --student-backbone DIR --data DIR --labelled 8791
        [--config pipeline-mpnet] [--seed 42] [--out bench/results] [key=value ...]

Runs `python -m lorakd.cli pipeline --config PRESET --data DATA data.labelled=N train.seed=SEED
model.backbone=STUDENT teacher.model.backbone=TEACHER key=value...` in a fresh process (the same preset, rows and
overrides trainer_way.py reads), times it from spawn to exit, and reads the pipeline folder it wrote for the
accuracies and each run's phases. Writes OUT/lorakd-pipeline-labelled<N>.json (N = 0: all labels), the name
`bench/distill_gain.py --scale-summary` pairs with trainer-way-labelled<N>.json for `pipeline_speedup` (and a
timestamped copy under OUT/scratch/, as every bench writes).
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from result_files import ROOT as REPO, result_paths, write_result


def versions():
    code = "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
    torch_v, tf_v, peft_v = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                           check=True).stdout.split()
    return f"torch {torch_v}, transformers {tf_v}, peft {peft_v}"


def run(args, folder: Path) -> dict:
    command = [sys.executable, "-m", "lorakd.cli", "pipeline", "--config", args.config, "--data", args.data,
               "--out", str(folder), f"data.labelled={args.labelled}", f"train.seed={args.seed}",
               f"model.backbone={args.student_backbone}", f"teacher.model.backbone={args.teacher_backbone}",
               *args.overrides]
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"pipeline_way: the pipeline failed ({done.returncode}):\n{done.stderr[-3000:]}")
    pipeline = json.loads((folder / "pipeline.json").read_text())
    runs = {role: json.loads((folder / role / "run.json").read_text())["summary"] for role in ("teacher", "student")}
    acc = {role: json.loads((folder / role / "eval.json").read_text())["validation"]["accuracy"]
           for role in ("teacher", "student")}
    return {"regime": regime(args.labelled), "seed": args.seed,
            "config": args.config, "overrides": args.overrides,
            "command": " ".join(["python -m lorakd.cli pipeline", *command[4:]]),
            "command_to_exit_s": round(wall, 2),
            "timing": "perf_counter around a fresh `python -m lorakd.cli pipeline` process, spawn to exit",
            "stages": pipeline["stages"], "teacher_acc": acc["teacher"], "student_acc": acc["student"],
            "teacher_phases_s": runs["teacher"]["phases_s"], "student_phases_s": runs["student"]["phases_s"],
            "samples_per_s": {role: round(s["samples_per_s"], 1) for role, s in runs.items()},
            "peak_gpu_gb": max(s.get("peak_gpu_gb", 0.0) for s in runs.values()),
            "device": runs["student"]["device"]}


def comparison_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments both sides of the comparison take (this script and bench/trainer_way.py): the same preset,
    backbones, rows and overrides."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--teacher-backbone", required=True)
    p.add_argument("--student-backbone", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--labelled", type=int, default=8791, help="labelled train rows; 0 = all")
    p.add_argument("--config", default="pipeline-mpnet", help="the pipeline preset lorakd runs (name or file)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default="bench/results")
    p.add_argument("overrides", nargs="*", help="key=value for the preset, as `lorakd pipeline` takes them")
    return p


def regime(labelled: int) -> str:
    return "all labels" if not labelled else f"labelled={labelled}"


def main(argv=None):
    args = comparison_parser(__doc__).parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pipeline-way-") as tmp:
        res = run(args, Path(tmp) / "pipeline")
    res["date"] = datetime.date.today().isoformat()
    res["versions"] = versions()
    paths = result_paths(f"lorakd-pipeline-labelled{args.labelled}", args.out, res["device"])
    write_result(paths, res)
    out = paths[0]
    print(f"{res['regime']}: {res['command_to_exit_s']} s command to exit; teacher {res['teacher_acc']:.4f}, "
          f"student {res['student_acc']:.4f} -> {out}")


if __name__ == "__main__":
    main()
