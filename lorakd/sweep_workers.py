"""A parallel sweep's workers: one long-lived process per GPU (`python -m lorakd.sweep_workers`) trains the
members it is handed one at a time, its output in logs/NAME.log; the sweep hands them out and records each end."""
from __future__ import annotations

import json
import os
import queue as queue_lib
import subprocess
import sys
import threading
import traceback
from pathlib import Path

import torch

from . import atomic
from . import config as config_lib
from . import train as train_lib
from .errors import UserError
from .runs import load_run, run_lock

REPO = Path(__file__).resolve().parent.parent


def _gpu_ids(gpus) -> list[str]:
    """GPU ids for the children: the first N of CUDA_VISIBLE_DEVICES when it is set, else 0..N-1."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [s.strip() for s in visible.split(",") if s.strip()] if visible else [str(i) for i in range(gpus)]
    if len(ids) < gpus:
        raise UserError(f"--gpus {gpus}: CUDA_VISIBLE_DEVICES={visible} lists only {len(ids)}")
    return ids[:gpus]


def _worker_command() -> list[str]:
    return [sys.executable, "-m", "lorakd.sweep_workers"]


def run_parallel(todo, gpus, sweep_dir, record):
    """One long-lived worker process per GPU (`python -m lorakd.sweep_workers`, see worker()) trains members one
    at a time: imports, CUDA start-up and warm caches are paid once per GPU, not once per member. Each member's
    output goes to logs/NAME.log (a streamed log: it grows while the member trains, so not written atomically)."""
    env = dict(os.environ)
    # the workers import this same lorakd, even from a checkout that is not installed
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    answers = queue_lib.Queue()  # (gpu, answer line or None at the worker's end), from one reader thread each
    workers, busy, idle, todo = {}, {}, _gpu_ids(gpus), list(todo)
    where = "GPU" if torch.cuda.is_available() else "CPU worker"
    if where != "GPU":
        print(f"sweep: no CUDA GPU is visible: --gpus {gpus} runs {gpus} CPU processes side by side, which share "
              f"this machine's cores (on a CPU one at a time is faster: leave out --gpus)")

    def start(gpu):
        proc = subprocess.Popen(_worker_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={**env, "CUDA_VISIBLE_DEVICES": gpu})
        threading.Thread(target=_relay, args=(proc, gpu, answers), daemon=True).start()
        workers[gpu] = proc

    try:
        while todo or busy:
            while todo and idle:
                m, gpu = todo.pop(0), idle.pop(0)
                if gpu not in workers:
                    start(gpu)
                log_path = sweep_dir / "logs" / f"{m['name']}.log"
                atomic.folder(log_path.parent)
                task = {"config": str(m["config_file"]), "run_dir": str(m["run_dir"]), "log": str(log_path),
                        "resume": m["status"] == "resume"}
                workers[gpu].stdin.write(json.dumps(task) + "\n")
                workers[gpu].stdin.flush()
                busy[gpu] = (m, log_path)
                print(f"sweep member {m['name']}: started on {where} {gpu} ({m['status']}; log {log_path})")
            gpu, line = answers.get()
            if line is None:  # the worker exited (a crash, a kill): a fresh one takes this GPU's next member
                rc = workers.pop(gpu).wait()
            if gpu not in busy:
                continue
            m, log_path = busy.pop(gpu)
            if line is not None:
                rc = json.loads(line)["rc"]
            idle.append(gpu)
            _finish(m, rc, log_path)
            record()
    finally:  # workers stop when their input closes; an interrupted sweep stops them (they checkpoint on
        for gpu, proc in workers.items():  # SIGTERM and resume next time)
            if gpu in busy:
                proc.terminate()
            try:
                proc.stdin.close()
            except OSError:
                pass
            proc.wait()


def _relay(proc, gpu, answers):
    """A worker's answers into the parent's queue, then None when its output ends (it exited)."""
    for line in proc.stdout:
        answers.put((gpu, line))
    answers.put((gpu, None))


def worker():
    """A parallel sweep's worker on one GPU: trains each member the parent sends (one JSON line on stdin) in
    this process and answers one JSON line {"rc": 0 | 1} on stdout; a member's own output goes to its log."""
    answer = os.fdopen(os.dup(1), "w", buffering=1)
    for line in sys.stdin:
        task = json.loads(line)
        run_dir = Path(task["run_dir"])
        fd = os.open(task["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)  # never a link
        with open(fd, "ab", buffering=0) as log:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(log.fileno(), 1)  # the fds, not just sys.stdout: native libraries' output lands there too
            os.dup2(log.fileno(), 2)
            rc = 0
            try:
                cfg = load_run(run_dir)[0] if task["resume"] else config_lib.load(task["config"])
                with run_lock(run_dir):
                    train_lib.train(cfg, run_dir, resume=task["resume"], plots=True)
                print(f"run folder: {run_dir}")
            except UserError as e:
                print(f"error: {e}")
                rc = 1
            except Exception:  # noqa: BLE001  one broken member must not take the others on this GPU down
                traceback.print_exc()
                rc = 1
            sys.stdout.flush(), sys.stderr.flush()
        answer.write(json.dumps({"rc": rc}) + "\n")
    os._exit(0)  # input closed, every member answered: skip the interpreter's slow teardown (as cli.entry)


def _finish(m, rc, log_path):
    info = load_run(m["run_dir"])[1] if (m["run_dir"] / "run.json").exists() else {}
    if rc == 0 and info.get("status") == "done":
        m.update(status="done", validation_accuracy=(info.get("summary") or {}).get("validation_accuracy"))
        print(f"sweep member {m['name']}: done")
        return
    lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines() if log_path.exists() else []
    m.update(status="failed", error=f"exit {rc}: {lines[-1] if lines else 'no output'}")
    print(f"sweep member {m['name']}: failed ({m['error']})")


if __name__ == "__main__":  # a parallel sweep's worker (see run_parallel)
    worker()
