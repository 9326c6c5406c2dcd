"""Training loop: schedules, budget refusal, NaN stop (a failed run), exact resume after SIGKILL / SIGTERM, and the
CUDA-graph capture policy."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lorakd import config as config_lib
from lorakd.errors import UserError
from lorakd.report import collect
from lorakd.runs import read_metrics
from lorakd.train import lr_factor, train


@pytest.mark.parametrize("schedule", ["linear", "cosine", "polynomial", "constant"])
def test_lr_schedule_matches_transformers(schedule):
    from transformers import get_scheduler

    total, warmup, lr = 50, 5, 1e-3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_scheduler(schedule if schedule != "constant" else "constant_with_warmup", opt,
                          num_warmup_steps=warmup, num_training_steps=total)
    for step in range(total):
        assert math.isclose(opt.param_groups[0]["lr"], lr * lr_factor(step, total, warmup, schedule, lr),
                            rel_tol=1e-6, abs_tol=1e-12), step
        opt.step()
        sched.step()


def test_budget_refused_before_training(tiny_config, tmp_path):
    cfg = tiny_config(**{"model.budget": 1000})
    with pytest.raises(UserError, match=r"trainable parameters exceed the budget of 1,000"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written


def test_teacher_role_has_no_budget(tiny_config, tmp_path):
    cfg = tiny_config(**{"model.budget": 1000, "role": "teacher", "model.full_finetune": True, "train.max_steps": 3})
    assert train(cfg, tmp_path / "run", log=lambda *a: None)["steps"] == 3


def test_nan_loss_stops_with_clear_message(tiny_config, tmp_path):
    cfg = tiny_config(**{"train.lr": 1e30, "train.grad_clip": 0.0, "train.checkpoint_every": 5, "train.log_every": 1})
    with pytest.raises(UserError, match="loss became nan"):
        train(cfg, tmp_path / "run", log=lambda *a: None)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "failed" and "loss became nan" in info["error"]  # said where report reads it
    assert [r["status"] for r in collect([tmp_path / "run"])] == ["failed"]
    resumed = train(tiny_config(**{"train.checkpoint_every": 5}), tmp_path / "run", resume=True, log=lambda *a: None)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "done" and "error" not in info and resumed["steps"] > 0


def test_existing_run_folder_is_not_overwritten(tiny_config, tmp_path):
    cfg = tiny_config(**{"train.max_steps": 2})
    train(cfg, tmp_path / "run", log=lambda *a: None)
    before = (tmp_path / "run" / "eval.json").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        train(cfg, tmp_path / "run", log=lambda *a: None)
    assert (tmp_path / "run" / "eval.json").read_bytes() == before


def _final(run_dir):
    records = [{k: v for k, v in r.items() if k != "samples_per_s"} for r in read_metrics(run_dir)]
    return records, json.loads((run_dir / "eval.json").read_text())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_resume_after_kill_matches_uninterrupted(tiny_config, tmp_path, sig):
    """A real training process is killed mid-epoch; the resumed run ends with the same metrics."""
    cfg = tiny_config(**{"train.checkpoint_every": 7, "train.epochs": 6, "model.dropout": 0.1, "train.log_every": 3})
    ref = tmp_path / "uninterrupted"
    train(cfg, ref, log=lambda *a: None)

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(config_lib.to_yaml(cfg))
    run = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "lorakd.cli", "train", "--config", str(cfg_file), "--out", str(run)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run / "checkpoint" / "state.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # land somewhere after the first checkpoint, mid-epoch
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert json.loads((run / "run.json").read_text())["status"] == "running", "the run finished before the kill"
    if sig == signal.SIGTERM:
        assert proc.returncode == 143  # checkpointed on the signal, then exited
    step = torch.load(ckpt, weights_only=True)["step"]  # a checkpoint holds no code
    assert 0 < step < 6 * 45

    subprocess.run(cmd[:4] + ["--resume", str(run)], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    assert json.loads((run / "run.json").read_text())["status"] == "done"
    got_records, got_eval = _final(run)
    want_records, want_eval = _final(ref)
    assert got_eval == want_eval
    assert got_records == want_records
    assert not ckpt.parent.exists()  # a finished run drops its resumable state, folder and all


def test_compile_switch_compiles_the_model_once(tiny_config, tmp_path, monkeypatch):
    """train.compile=true hands the model to torch.compile (nn.Module.compile, inductor) before training;
    off (the default) leaves it eager. Inductor itself is not run here: compiling takes minutes on 2 cores
    (12 steps compiled vs eager agreed to < 1e-4 in a one-off check); the GPU bench measures the lever."""
    import torch

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    train(tiny_config(**{"train.max_steps": 2}), tmp_path / "off", log=lambda *a: None)
    assert compiled == []
    train(tiny_config(**{"train.max_steps": 2, "train.compile": True}), tmp_path / "on", log=lambda *a: None)
    assert compiled == ["PeftModelForSequenceClassification"]


def test_prewarm_warms_each_padded_width_of_the_run(tiny_config):
    """train.prewarm (on by default) hands the background CUDA thread the backbone's widths, this process's
    batch and every padded width the length buckets give (the widest first, at most 8); off, or on a CPU,
    nothing is warmed. The warm step itself runs here on the CPU: no random numbers drawn, so a seeded run
    trains as it would without it."""
    from lorakd import model as model_lib
    from lorakd.train import warm_spec

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # warm_spec only reads the device type
    cfg = tiny_config(**{"data.max_length": 128, "data.pad_multiple": 32, "train.batch_size": 24})
    assert cfg.train.prewarm
    assert warm_spec(cfg, cuda, 1) == ((32, 2, 64), 24, [128, 96, 64, 32], True)  # the tiny BERT's config.json
    assert warm_spec(tiny_config(**{"train.precision": "fp32"}), cuda, 1)[3] is False
    assert warm_spec(cfg, cuda, 2)[1] == 12  # each process warms its shard of the global batch
    assert warm_spec(cfg, cpu, 1) is None
    assert warm_spec(tiny_config(**{"train.prewarm": False}), cuda, 1) is None
    assert warm_spec(tiny_config(**{"data.max_length": 100, "data.pad_multiple": 1}), cuda, 1)[2] == list(range(100, 92, -1))
    assert warm_spec(tiny_config(**{"model.backbone": "someone/not-here"}), cuda, 1) is None  # a hub id: no config
    assert model_lib.warm_dims("roberta-base") == (768, 12, 3072)
    assert model_lib.warm_dims("embedded:minilm") == (384, 12, 1536)
    assert model_lib.start_device(cpu, ((32, 2, 64), 8, [16], True)) is None

    before = torch.get_rng_state()
    for bf16 in (True, False):
        model_lib._warm_step(cpu, 32, 2, 64, batch=4, length=16, bf16=bf16)
    assert torch.equal(torch.get_rng_state(), before)



class _Recorder:
    """GraphedStep's capture policy without a GPU: records how many warm-ups each try ran, and fails the
    (width, warm-ups) tries the test names."""

    def __init__(self, fail):
        self.fail, self.tries = fail, []

    def __call__(self, idx, width, warmups):
        self.tries.append((width, warmups))
        if (width, warmups) in self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        return f"graph-{width}", idx


def _graphed(fail=(), warmups=0, required=False):
    from lorakd.train import GraphedStep

    said = []
    g = GraphedStep(step=None, params=[], optimizer=None, acc=None, required=required, log=said.append,
                    later_warmups=warmups)
    g._record = _Recorder(set(fail))
    return g, said


def capture(g, width):
    got = g._capture(torch.zeros(24), width)
    if got is not None:
        g.graphs[(24, width)] = got
    return got


def test_capture_warms_the_first_shape_twice_and_a_later_one_only_when_it_needs_it():
    g, said = _graphed(fail={(64, 0)})  # the 64-wide shape has lazy state of its own (DeBERTa-v2's positions)
    assert [capture(g, w)[0] for w in (32, 96, 64)] == ["graph-32", "graph-96", "graph-64"]
    assert g._record.tries == [(32, 2), (96, 0), (64, 0), (64, 1)] and not said and not g.plain


def test_capture_warmups_setting_is_used_for_later_shapes_without_a_retry():
    g, _ = _graphed(warmups=1)
    capture(g, 32), capture(g, 64)
    assert g._record.tries == [(32, 2), (64, 1)]


def test_a_shape_that_never_captures_falls_back_in_one_line_or_fails_under_on():
    g, said = _graphed(fail={(32, 2)})
    assert capture(g, 32) is None and g.plain
    assert said == ["CUDA graphs off: the step cannot be captured (operation not permitted when stream is "
                    "capturing); training with the plain step"]
    g, said = _graphed(fail={(64, 0), (64, 1)})
    capture(g, 32)
    assert capture(g, 64) is None and g.plain and g._record.tries == [(32, 2), (64, 0), (64, 1)]
    g, _ = _graphed(fail={(32, 2)}, required=True)
    with pytest.raises(UserError, match="train.cuda_graphs=on: this backbone's step cannot be captured"):
        capture(g, 32)
