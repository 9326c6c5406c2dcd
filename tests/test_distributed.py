"""Data parallel on the CPU: 2 processes (torchrun, gloo) give what 1 process gives with the same global batch."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from lorakd import config as config_lib
from lorakd.runs import read_metrics


def _train_with_torchrun(cfg, tmp_path, processes):
    """`lorakd train` under torchrun on the CPU (gloo); returns the run folder."""
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(config_lib.to_yaml(cfg))
    out = tmp_path / f"p{processes}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "lorakd.cli", "train", "--config", str(cfg_file), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if processes > 1:  # rank 0 says how the global batch is split; the other ranks stay quiet
        assert proc.stdout.count(f"data parallel: {processes} processes (cpu)") == 1
    return out


needs_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None and sys.platform != "linux",
                                    reason="needs torchrun")


@needs_torchrun
def test_two_processes_match_one(tiny_config, tmp_path):
    cfg = tiny_config(**{"train.device": "cpu", "train.epochs": 2, "model.dropout": 0.0, "train.batch_size": 8,
                         "train.eval_every": 15, "train.log_every": 1})
    results = {}
    for n in (1, 2):
        out = _train_with_torchrun(cfg, tmp_path, n)
        results[n] = (json.loads((out / "eval.json").read_text()), json.loads((out / "run.json").read_text()))
    (e1, r1), (e2, r2) = results[1], results[2]
    assert r2["summary"]["world_size"] == 2 and r1["summary"]["world_size"] == 1
    assert r1["summary"]["steps"] == r2["summary"]["steps"]  # the global batch is kept
    # The same trajectory up to float summation order (gradients are summed in another order). That
    # noise is amplified once training leaves its plateau (lr 2e-2), so step-level agreement is checked
    # early, and the end only loosely.
    train_curve = {n: [r["loss"] for r in read_metrics(tmp_path / f"p{n}") if r["split"] == "train"] for n in (1, 2)}
    assert len(train_curve[1]) == len(train_curve[2]) == r1["summary"]["steps"]
    assert train_curve[2][:36] == pytest.approx(train_curve[1][:36], rel=1e-5)
    val_curve = {n: [r["loss"] for r in read_metrics(tmp_path / f"p{n}") if r["split"] == "validation"] for n in (1, 2)}
    assert len(val_curve[1]) == len(val_curve[2]) == 6
    assert val_curve[2][:3] == pytest.approx(val_curve[1][:3], rel=1e-4)
    for split in ("validation", "test"):
        assert e2[split]["loss"] == pytest.approx(e1[split]["loss"], rel=0.1)
        assert abs(e2[split]["accuracy"] - e1[split]["accuracy"]) <= 0.1
    assert not list((tmp_path / "p2").glob("*rank*"))  # only rank 0 wrote the folder


@needs_torchrun
def test_uneven_last_batch_is_weighted_like_one_process(tiny_config, tmp_path):
    """357 training rows in batches of 8: one batch an epoch holds 5 rows, split 3/2 over 2 processes.
    Each process's loss is weighted by its share, so the averaged gradient is still the global batch mean."""
    cfg = tiny_config(**{"train.device": "cpu", "train.epochs": 2, "model.dropout": 0.0, "train.batch_size": 8,
                         "data.max_train_samples": 357, "train.log_every": 1, "train.lr": 1e-2,
                         "train.weight_decay": 0.0})
    curves = {}
    for n in (1, 2):
        out = _train_with_torchrun(cfg, tmp_path, n)
        curves[n] = [r["loss"] for r in read_metrics(out) if r["split"] == "train"]
    assert len(curves[1]) == len(curves[2]) == 90  # 44 full batches + the 5-row one, twice
    # the first epoch (its uneven batch included) and the start of the second: equal up to summation order
    assert curves[2][:52] == pytest.approx(curves[1][:52], rel=2e-5)


def test_finished_command_leaves_its_process_group(tiny_backbone, monkeypatch):
    """A torchrun process leaves its group when its command is done (NCCL warns and may leak otherwise)."""
    import socket

    import torch.distributed as dist

    from lorakd.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        main(["params", "--model", str(tiny_backbone), "--r", "2"])
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
