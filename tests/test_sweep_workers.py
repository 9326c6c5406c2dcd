"""A parallel sweep's workers: one process per GPU (a fake worker for the scheduling, the real one for the
results), and which GPUs they get."""
import json
import os
import sys

import pytest
import torch

from conftest import write_sweep
from lorakd import sweep, sweep_workers
from lorakd.errors import UserError
from lorakd.runs import read_metrics


@pytest.fixture(autouse=True)
def _no_gpu_env(monkeypatch):
    # children of the parallel test must not see a GPU list from the machine running the tests
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")


FAKE_WORKER = """
import json, os, pathlib, shutil, sys, time
for line in sys.stdin:
    task = json.loads(line)
    cfg, run = pathlib.Path(task["config"]), pathlib.Path(task["run_dir"])
    t0 = time.time()
    time.sleep(0.5)
    run.mkdir(parents=True)
    shutil.copy(cfg, run / "config.yaml")
    if run.name.startswith("r=5"):
        os._exit(5)  # the worker dies with its member
    ok = not run.name.startswith("r=3")
    info = {"format": 1, "status": "done" if ok else "running", "summary": {"validation_accuracy": 0.5, "trainable": 1}}
    (run / "run.json").write_text(json.dumps(info))
    with open(task["log"], "a") as log:
        log.write(f"{os.environ['CUDA_VISIBLE_DEVICES']} {os.getpid()} {t0} {time.time()}\\n")
    print(json.dumps({"rc": 0 if ok else 3}), flush=True)
"""


def test_sweep_parallel_scheduling(tiny_config, tmp_path, monkeypatch, capsys):
    """One worker per GPU trains several members, one at a time, each told its GPU; a failing member is
    recorded and named at the end; a worker that dies takes only its member down, a fresh one goes on."""
    monkeypatch.setattr(sweep_workers, "_worker_command", lambda: [sys.executable, "-c", FAKE_WORKER])
    path = write_sweep(tmp_path, tiny_config, grid={"model.r": [1, 2, 3, 4, 5, 6, 7]}, out=str(tmp_path / "par"))
    with pytest.raises(UserError, match=r"2 sweep member\(s\) failed: r=3, r=5"):
        sweep.run_sweep(path, gpus=2)
    if not torch.cuda.is_available():  # said, not claimed as GPUs
        out = capsys.readouterr().out
        assert "no CUDA GPU is visible: --gpus 2 runs 2 CPU processes" in out and "started on CPU worker 0" in out
    spans = [(tmp_path / "par" / "logs" / f"r={r}.log").read_text().split() for r in (1, 2, 4, 6, 7)]
    assert {gpu for gpu, *_ in spans} == {"0", "1"}
    assert len({pid for _, pid, *_ in spans}) <= 3  # 5 members, 2 workers (+1 after the crash), not 5 processes
    starts_ends = [(float(a), float(b)) for *_, a, b in spans]
    for t, _ in starts_ends:  # never more than two running at once
        assert sum(a <= t < b for a, b in starts_ends) <= 2
    rec = json.loads((tmp_path / "par" / "sweep.json").read_text())
    assert [m["status"] for m in rec["members"]] == ["done", "done", "failed", "done", "failed", "done", "done"]
    assert rec["members"][2]["error"].startswith("exit 3")
    assert rec["members"][4]["error"].startswith("exit 5")


def test_sweep_parallel_real_worker(tiny_config, tmp_path, monkeypatch):
    """The real worker (`python -m lorakd.sweep_workers`): one worker per GPU, the one with two members trains both
    in its one process (a second train() after the first) with the same results as an in-process sweep."""
    monkeypatch.chdir(tmp_path)
    grid = {"model.r": [2, 3, 4]}
    path = write_sweep(tmp_path, tiny_config, set={"train.max_steps": 6}, grid=grid, out=str(tmp_path / "par"))
    members = sweep.run_sweep(path, gpus=2)
    assert [m["status"] for m in members] == ["done"] * 3
    seq = sweep.run_sweep(write_sweep(tmp_path / "seq", tiny_config, set={"train.max_steps": 6}, grid=grid,
                                      out=str(tmp_path / "seq" / "out")))
    for m, s in zip(members, seq):
        losses = [[(r["step"], r["split"], r["loss"]) for r in read_metrics(x["run_dir"])] for x in (m, s)]
        assert losses[0] == losses[1] and len(losses[0]) > 1  # the same losses, step by step
    assert "run folder:" in (tmp_path / "par" / "logs" / "r=4.log").read_text()  # its output went to its log
    assert (tmp_path / "par" / "r=4" / "plots" / "val_accuracy.png").exists()
    assert (tmp_path / "par" / "report" / "results.md").exists()


def test_gpu_ids(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert sweep_workers._gpu_ids(3) == ["0", "1", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7,2")
    assert sweep_workers._gpu_ids(2) == ["5", "7"]
    with pytest.raises(UserError, match="lists only 3"):
        sweep_workers._gpu_ids(4)

