"""Exact resume on the GPU path: runs killed mid-epoch (SIGKILL, SIGTERM) and resumed, against an uninterrupted one.

On a GPU machine, in one call, from the repo root:
    python bench/resume_gpu.py --backbone .device-carry/minilm --data .device-carry/data
Every run is a `python -m lorakd.cli train --config agnews-minilm --data D --out X
model.backbone=B train.checkpoint_every=N [--set ...]` subprocess: one uninterrupted (the reference), a second
uninterrupted one (the noise floor; --no-noise leaves it out), and one per signal that is killed once its first
checkpoint exists (--kill-after seconds later, so mid-epoch) and then continued with `lorakd train --resume`.
Each run's metrics.jsonl (samples_per_s aside) and eval.json are compared with the reference's: the largest
absolute difference of each record, and over all. Prints a table and writes
bench/results/resume-gpu.json (a timestamped copy and the runs' log in bench/results/scratch/).

On a GPU the runs may differ in the last bits instead of matching exactly: with bf16 autocast and CUDA-graph
replay, backward kernels add with atomics in no fixed order, so two uninterrupted runs can differ too. The
script reports the largest difference next to that noise floor rather than failing on it. On a CPU it is
exact. A CPU smoke test (a few minutes on two cores):
    python bench/resume_gpu.py --set train.device=cpu train.max_steps=60 train.eval_every=20 \\
        train.log_every=10 --checkpoint-every 15 --no-noise --out /tmp/resume-smoke
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
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
from result_files import result_paths, write_result  # noqa: E402
from lorakd.runs import read_metrics  # noqa: E402


def flat(obj, prefix=""):
    """{'a.b': leaf} of nested dicts and lists: every number of a record or of eval.json by its path."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in flat(val, f"{prefix}{key}.").items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in flat(val, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): obj}


def difference(got, want) -> tuple[float, str]:
    """(largest absolute difference, where): inf where a key is missing or a non-number differs."""
    got, want = flat(got), flat(want)
    worst, where = 0.0, ""
    for key in sorted(set(got) | set(want)):
        a, b = got.get(key), want.get(key)
        if a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
            continue
        numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
        d = abs(a - b) if numbers and not math.isnan(a - b) else math.inf
        if d > worst or not where:
            worst, where = d, key
    return worst, where


def records(run_dir):
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in read_metrics(run_dir)]


def compare(run_dir, ref_dir) -> dict:
    got, want = records(run_dir), records(ref_dir)
    per_record = []
    for i in range(max(len(got), len(want))):
        a, b = (got[i] if i < len(got) else {}), (want[i] if i < len(want) else {})
        d, key = difference(a, b)
        per_record.append({"step": (a or b).get("step"), "split": (a or b).get("split"), "max_abs_diff": d,
                           "where": key})
    eval_got, eval_want = (json.loads((d / "eval.json").read_text()) for d in (run_dir, ref_dir))
    eval_diff, eval_where = difference(eval_got, eval_want)
    worst = max(per_record, key=lambda r: r["max_abs_diff"], default={"max_abs_diff": 0.0})
    return {"identical": got == want and eval_got == eval_want, "records": [len(got), len(want)],
            "metrics_max_abs_diff": worst["max_abs_diff"],
            "metrics_where": (f"step {worst['step']} {worst['split']} {worst['where']}" if worst["max_abs_diff"]
                              else ""),
            "eval_max_abs_diff": eval_diff, "eval_where": eval_where,
            "val_accuracy": [eval_got.get("validation", {}).get("accuracy"),
                             eval_want.get("validation", {}).get("accuracy")],
            "per_record": per_record}


class Runner:
    def __init__(self, args, log_path):
        self.args, self.log_path = args, log_path
        self.env = dict(os.environ, PYTHONUNBUFFERED="1",  # this checkout's lorakd, installed or not
                        PYTHONPATH=os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]]
                                                                  if os.environ.get("PYTHONPATH") else [])))

    def command(self, out, resume=False):
        cmd = [sys.executable, "-m", "lorakd.cli", "train"]
        if resume:
            return cmd + ["--resume", str(out)]
        a = self.args
        return cmd + ["--config", a.config, "--data", a.data, "--out", str(out), f"model.backbone={a.backbone}",
                      f"train.checkpoint_every={a.checkpoint_every}", *a.set]

    def start(self, cmd):
        log = open(self.log_path, "a")
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        return subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log

    def run(self, cmd):
        """Exit code of cmd, run to the end (or to --timeout)."""
        proc, log = self.start(cmd)
        try:
            return proc.wait(timeout=self.args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
        finally:
            log.close()

    def killed_and_resumed(self, out, sig) -> dict:
        """Train into out, kill it with sig once a checkpoint exists, resume it; what happened."""
        ckpt = out / "checkpoint" / "state.pt"
        proc, log = self.start(self.command(out))
        deadline = time.time() + self.args.timeout
        while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(self.args.kill_after)  # land between checkpoints, mid-epoch
        proc.send_signal(sig)
        rc = proc.wait()
        log.close()
        info = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
        res = {"signal": signal.Signals(sig).name, "exit_code": rc}
        if info.get("status") != "running" or not ckpt.exists():
            res["error"] = (f"no checkpoint to resume from (status {info.get('status')}, exit {rc}): lower "
                            "--checkpoint-every or --kill-after, or raise train.max_steps")
            return res
        try:  # what the train.py loader reads: tensors, dicts, lists and numbers only
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            res.update(checkpoint_step=state["step"], checkpoint_loads_weights_only=True)
        except Exception as e:
            res.update(checkpoint_loads_weights_only=False, checkpoint_error=f"{type(e).__name__}: {e}"[:300])
        start = len(Path(self.log_path).read_text())
        res["resume_exit_code"] = self.run(self.command(out, resume=True))
        m = re.search(r"resumed at step (\d+) of (\d+)", Path(self.log_path).read_text()[start:])
        res["resumed_at_step"], res["total_steps"] = (int(m[1]), int(m[2])) if m else (None, None)
        return res


def print_table(rows):
    cols = ("run", "resumed_at_step", "records", "identical", "metrics_max_abs_diff", "metrics_where",
            "eval_max_abs_diff", "val_accuracy")
    text = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for t in text:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="embedded:minilm")
    ap.add_argument("--data", default="../shared/data/ag_news")
    ap.add_argument("--config", default="agnews-minilm")
    ap.add_argument("--checkpoint-every", type=int, default=100,
                    help="train.checkpoint_every: the kill comes after the first one")
    ap.add_argument("--kill-after", type=float, default=0.1, help="seconds after the first checkpoint")
    ap.add_argument("--signals", default="SIGKILL,SIGTERM")
    ap.add_argument("--no-noise", action="store_true", help="skip the second uninterrupted run")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value",
                    help="config overrides for every run, e.g. train.device=cpu train.max_steps=60")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds allowed to one training process")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="", help="suffix of the result file's name")
    args = ap.parse_args()
    for key in ("data", "backbone", "config"):  # the runs start in the repo root: paths from here made absolute
        if Path(getattr(args, key)).exists():
            setattr(args, key, str(Path(getattr(args, key)).resolve()))
    on_cpu = any(s.replace(" ", "") == "train.device=cpu" for s in args.set) or not torch.cuda.is_available()
    dev = "cpu" if on_cpu else torch.cuda.get_device_name()
    result = {"device": dev, "date": date.today().isoformat(), "torch": torch.__version__, "config": args.config,
              "backbone": args.backbone, "data": args.data, "set": args.set,
              "checkpoint_every": args.checkpoint_every, "kill_after_s": args.kill_after, "runs": []}
    out_paths = result_paths(f"resume-gpu{'-' + args.tag if args.tag else ''}", args.out, dev)
    out_path, log_path = out_paths[0], out_paths[1].with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    work = Path(tempfile.mkdtemp(prefix="lorakd-resume-"))
    runner = Runner(args, log_path)

    t0 = time.time()
    ref = work / "reference"
    rc = runner.run(runner.command(ref))
    if rc != 0:
        sys.exit(f"the uninterrupted run failed (exit {rc}); see {log_path}")
    rows = []
    if not args.no_noise:
        again = work / "reference-again"
        rc = runner.run(runner.command(again))
        row = {"run": "uninterrupted again (noise floor)", "exit_code": rc}
        row.update(compare(again, ref) if rc == 0 else {"error": f"exit {rc}"})
        rows.append(row)
    for name in args.signals.split(","):
        sig = getattr(signal, name.strip())
        out = work / f"killed-{name.strip()}"
        row = {"run": f"{name.strip()} + resume", **runner.killed_and_resumed(out, sig)}
        if "error" not in row and row.get("resume_exit_code") == 0:
            row.update(compare(out, ref))
        rows.append(row)
    result["runs"] = rows
    result["wall_s"] = round(time.time() - t0, 1)
    write_result(out_paths, result)
    print_table(rows)
    for r in rows:
        differing = [p for p in r.get("per_record", []) if p["max_abs_diff"] > 0][:10]
        if differing:
            print(f"\n{r['run']}: records that differ (first 10):")
            for p in differing:
                print(f"  step {p['step']} {p['split']}: {p['max_abs_diff']:.3g} ({p['where']})")
        if "error" in r:
            print(f"\n{r['run']}: {r['error']}")
    print(f"\n{result['wall_s']}s; wrote {out_path} and {log_path}")


if __name__ == "__main__":
    main()
