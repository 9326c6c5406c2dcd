"""Training loop: schedules, budget refusal, NaN stop (a failed run), exact resume after SIGKILL / SIGTERM."""
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
from lorakd.step import make_optimizer, make_scheduler
from lorakd.train import train


@pytest.mark.parametrize("schedule, at_20", [("linear", 30 / 45), ("cosine", 0.75),
                                             ("polynomial", (1e-3 - 1e-7) * (30 / 45) / 1e-3 + 1e-4),
                                             ("constant", 1.0)])
def test_lr_schedule_is_transformers_after_a_linear_warmup(schedule, at_20, tiny_config):
    """train.schedule names transformers' schedules (constant: constant_with_warmup) over optimizer steps: 50
    steps, 5 of warm-up; the lr before step 20 is the closed form's (polynomial: power 1 down to 1e-7)."""
    cfg = tiny_config(**{"train.schedule": schedule, "train.lr": 1e-3})
    model = torch.nn.Linear(2, 2)
    optimizer, _ = make_optimizer(model, cfg, torch.device("cpu"))
    sched = make_scheduler(optimizer, cfg, total=50, warmup=5)
    lrs = []
    for _ in range(50):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    assert lrs[0] == 0.0 and math.isclose(lrs[2], 0.4e-3) and math.isclose(lrs[5], 1e-3)
    assert math.isclose(lrs[20], 1e-3 * at_20, rel_tol=1e-9)
    assert sched.state_dict()["last_epoch"] == 50  # what a checkpoint keeps


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


@pytest.mark.parametrize("every, minutes, saved_at", [(0, 1e-9, [2, 4]), (3, 0, [3, 6]), (0, 0, []),
                                                      (0, 60, [])])
def test_checkpoints_by_steps_or_by_minutes(tiny_config, tmp_path, monkeypatch, every, minutes, saved_at):
    """train.checkpoint_every counts steps; train.checkpoint_minutes is read where the loss is logged (every
    train.log_every steps, not at the last one): due once that much wall time has passed since the last one."""
    import lorakd.train as train_module
    steps, save = [], train_module.save_checkpoint
    monkeypatch.setattr(train_module, "save_checkpoint", lambda run, *a: (steps.append(run.state.step), save(run, *a)))
    cfg = tiny_config(**{"train.max_steps": 6, "train.log_every": 2, "train.checkpoint_every": every,
                         "train.checkpoint_minutes": minutes})
    train(cfg, tmp_path / "run", log=lambda *a: None)
    assert steps == saved_at
    phases = json.loads((tmp_path / "run" / "run.json").read_text())["summary"]["phases_s"]
    assert ("checkpoints" in phases) == bool(saved_at)  # their time is its own phase


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
    from lorakd import graphs
    from lorakd.train_setup import warm_spec

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
    assert graphs.warm_dims("roberta-base") == (768, 12, 3072)
    assert graphs.warm_dims("embedded:minilm") == (384, 12, 1536)
    assert graphs.start_device(cpu, ((32, 2, 64), 8, [16], True)) is None

    before = torch.get_rng_state()
    for bf16 in (True, False):
        graphs._warm_step(cpu, 32, 2, 64, batch=4, length=16, bf16=bf16)
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------- gradient accumulation, early stopping, signals

def _adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _stop_by_signal_at(monkeypatch, step, sig):
    """The next train() in this process gets `sig` right after its `step`-th optimizer step (as a user's Ctrl-C
    or a scheduler's SIGTERM would arrive), at the same point every time."""
    from lorakd import train as train_lib

    real, taken = train_lib.take_step, []

    def take_step(run, micro_batches):
        real(run, micro_batches)
        taken.append(1)
        if len(taken) == step:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(train_lib, "take_step", take_step)


def _interrupted_then_resumed(monkeypatch, cfg, run, step, sig=signal.SIGTERM):
    _stop_by_signal_at(monkeypatch, step, sig)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python starts on a terminal
    try:
        with pytest.raises(KeyboardInterrupt if sig == signal.SIGINT else SystemExit):
            train(cfg, run, log=lambda *a: None)
    finally:
        signal.signal(signal.SIGINT, old)
    monkeypatch.undo()
    assert torch.load(run / "checkpoint" / "state.pt", weights_only=True)["step"] == step
    return train(cfg, run, resume=True, log=lambda *a: None)


def test_grad_accum_of_micro_batches_is_one_batch_of_their_rows(tiny_config, tmp_path):
    """2 micro-batches of 4 rows per optimizer step train as 1 batch of 8 (no dropout; batches in file order
    of the seeded shuffle, not grouped by length): the same steps, schedule, losses and weights, to float
    tolerance. batch_size stays the micro-batch; train.max_steps counts optimizer steps."""
    common = {"data.group_by_length": False, "train.max_steps": 24, "train.eval_every": 8, "train.log_every": 4,
              "train.precision": "fp32"}  # bf16 on a GPU would round the two differently
    one = train(tiny_config(**common), tmp_path / "one", log=lambda *a: None)
    accum = train(tiny_config(**common, **{"train.batch_size": 4, "train.grad_accum": 2}), tmp_path / "accum",
                  log=lambda *a: None)
    assert one["steps"] == accum["steps"] == 24
    want, got = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "accum")
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
    for w, g in zip(want, got):
        assert g.get("lr", 0) == pytest.approx(w.get("lr", 0), rel=1e-12)
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4, abs=1e-6), (w, g)
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "accum")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
    assert accum["validation_accuracy"] == one["validation_accuracy"]


def test_grad_accum_counts_optimizer_steps_and_resumes_exactly(tiny_config, tmp_path, monkeypatch):
    """4 micro-batches of 8 per update: an epoch of 45 batches is 12 optimizer steps, its last one a single
    batch; a run stopped in its second epoch and resumed ends as the uninterrupted one."""
    cfg = tiny_config(**{"train.grad_accum": 4, "train.epochs": 2, "train.log_every": 2, "train.eval_every": 5,
                         "model.dropout": 0.1})
    want = train(cfg, tmp_path / "uninterrupted", log=lambda *a: None)
    assert want["steps"] == 24 and want["samples_per_s"] > 0
    got = _interrupted_then_resumed(monkeypatch, cfg, tmp_path / "resumed", 13)
    assert got["steps"] == want["steps"]
    assert _final(tmp_path / "resumed") == _final(tmp_path / "uninterrupted")
    a, b = _adapter(tmp_path / "uninterrupted"), _adapter(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_stops_keeps_the_best_and_resumes_exactly(tiny_config, tmp_path, monkeypatch):
    """train.early_stop_patience 2: the run stops at the second evaluation in a row without a better
    validation accuracy; the best weights (and their metrics) are the result; stopped and resumed midway, it
    stops at the same step with the same result."""
    cfg = tiny_config(**{"train.early_stop_patience": 2, "train.eval_every": 3, "train.epochs": 20,
                         "train.log_every": 3, "model.dropout": 0.1})
    want = train(cfg, tmp_path / "uninterrupted", log=lambda *a: None)
    val = [r for r in read_metrics(tmp_path / "uninterrupted") if r["split"] == "validation"]
    accs = [r["accuracy"] for r in val]
    best = max(range(len(accs)), key=lambda i: (accs[i], -i))  # the first at the highest accuracy
    assert want["stopped_early"] and want["steps"] < 20 * 45
    assert len(val) == best + 3 and val[-1]["step"] == want["steps"]  # two evaluations after the best, then stop
    assert want["best_step"] == val[best]["step"] and want["validation_accuracy"] == accs[best]
    assert json.loads((tmp_path / "uninterrupted" / "eval.json").read_text())["validation"]["accuracy"] == accs[best]

    # stopped at the first evaluation after the best: the count of evaluations without a better one resumes too
    got = _interrupted_then_resumed(monkeypatch, cfg, tmp_path / "resumed", val[best + 1]["step"])
    assert (got["steps"], got["best_step"], got["stopped_early"]) == (want["steps"], want["best_step"], True)
    assert _final(tmp_path / "resumed") == _final(tmp_path / "uninterrupted")


def test_a_checkpoint_without_the_schedule_resumes_exactly(tiny_config, tmp_path, monkeypatch):
    """A checkpoint written before the lr schedule's state was kept in it resumes with the schedule at its step."""
    cfg = tiny_config(**{"train.epochs": 1, "train.log_every": 3})
    train(cfg, tmp_path / "uninterrupted", log=lambda *a: None)
    _stop_by_signal_at(monkeypatch, 20, signal.SIGTERM)
    with pytest.raises(SystemExit):
        train(cfg, tmp_path / "older", log=lambda *a: None)
    monkeypatch.undo()
    ckpt = tmp_path / "older" / "checkpoint" / "state.pt"
    saved = torch.load(ckpt, weights_only=True)
    del saved["scheduler"]
    torch.save(saved, ckpt)
    train(cfg, tmp_path / "older", resume=True, log=lambda *a: None)
    assert _final(tmp_path / "older") == _final(tmp_path / "uninterrupted")


def test_early_stopping_needs_a_validation_split(tiny_config, tmp_path):
    with pytest.raises(UserError, match="train.early_stop_patience: early stopping needs a validation split"):
        train(tiny_config(**{"train.early_stop_patience": 2, "data.val_fraction": 0.0}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_ctrl_c_in_process_checkpoints_the_step_and_resumes_exactly(tiny_config, tmp_path, monkeypatch):
    """Ctrl-C (SIGINT) ends the current step, checkpoints it and raises KeyboardInterrupt (a notebook's
    interrupt, the cli's exit 130); the resumed run ends as the uninterrupted one."""
    cfg = tiny_config(**{"train.epochs": 2, "train.eval_every": 10, "model.dropout": 0.1})
    train(cfg, tmp_path / "uninterrupted", log=lambda *a: None)
    _interrupted_then_resumed(monkeypatch, cfg, tmp_path / "resumed", 17, signal.SIGINT)
    assert _final(tmp_path / "resumed") == _final(tmp_path / "uninterrupted")


@pytest.mark.parametrize("sig, rc", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_checkpoint_and_print_the_resume_line(tiny_config, tmp_path, sig, rc):
    """`lorakd train` sent Ctrl-C (SIGINT) or SIGTERM mid-run: a checkpoint at the step it was on, the run
    still `running`, and one line saying how to continue, the same for both."""
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(config_lib.to_yaml(tiny_config(**{"train.checkpoint_every": 5, "train.epochs": 20})))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lorakd.cli", "train", "--config", str(cfg_file), "--out", str(run)]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's
    deadline = time.time() + 120
    while not (run / "checkpoint" / "state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == rc, err
    step = torch.load(run / "checkpoint" / "state.pt", weights_only=True)["step"]
    assert f"stopped by signal at step {step}; continue with: lorakd train --resume {run}\n" in out
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    if sig == signal.SIGINT:
        assert err.rstrip().endswith("lorakd: interrupted")


class _Terminal(__import__("io").StringIO):
    """stdout and stderr of a terminal, in one stream: a progress bar shows (tqdm draws on a TTY)."""

    def isatty(self):
        return True

    def screen(self):
        """The lines as the terminal shows them: each carriage return goes back to the line's start."""
        lines = []
        for raw in self.getvalue().split("\n"):
            shown = ""
            for part in raw.split("\r"):
                shown = part + shown[len(part):]
            lines.append(shown.rstrip())
        return lines


def test_metric_lines_never_continue_a_progress_bar(tiny_config, tmp_path, monkeypatch):
    """On a terminal the training bar and the evaluations' own bars draw, and every line lorakd prints
    (validation accuracy, the tables) starts on a line of its own, never after a bar's text."""
    term = _Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    train(tiny_config(**{"train.max_steps": 12, "train.eval_every": 4, "train.log_every": 2}), tmp_path / "run")
    screen = term.screen()
    said = [line for line in screen if "validation accuracy" in line]
    assert len(said) == 3 and all(line.startswith("step ") for line in said), said
    assert any(line.startswith("validation: accuracy") for line in screen)
    assert any(line.startswith("test: accuracy") for line in screen)
    raw = term.getvalue()
    assert "12/12" in raw and "validation:" in raw and "test:" in raw  # the bars drew (they leave no line)
