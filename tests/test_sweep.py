"""Sweeps on the tiny BERT (budget skip, resume, parallel subprocesses), fit-budget's sweep file, presets."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lorakd import budget, config, sweep
from lorakd.errors import UserError
from lorakd.runs import read_metrics
from lorakd.budget import count_params



def write_sweep(folder, tiny_config, **spec):
    """A base config next to a sweep file that names it relatively."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(config.to_yaml(tiny_config(**{"train.epochs": 1})))
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "base": "base.yaml", **spec}, sort_keys=False))
    return path


def test_sweep_budget_skip_and_resume(tiny_config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # r=4 on the tiny BERT is 1,668 trainable: the third member's budget of 1,000 skips it
    path = write_sweep(tmp_path / "spec", tiny_config, grid={"model.r": [2, 4]},
                       members=[{"model.r": 4, "model.budget": 1000}])
    members = sweep.run_sweep(path)
    out = capsys.readouterr().out
    assert "over budget, skipped (1):" in out and "r=4_budget=1000: 1,668 > 1,000" in out
    sdir = tmp_path / "runs" / "sweep-tiny"
    names = ["r=2_budget=1000000", "r=4_budget=1000000", "r=4_budget=1000"]
    assert [m["name"] for m in members] == names
    assert [m["status"] for m in members] == ["done", "done", "over budget"]
    rec = json.loads((sdir / "sweep.json").read_text())
    assert rec["over_budget"] == [{"name": "r=4_budget=1000", "trainable": 1668, "budget": 1000}]
    assert [m["trainable"] for m in rec["members"]] == [1668 - 768, 1668, 1668]
    assert not (sdir / names[2]).exists() and (sdir / "configs" / f"{names[2]}.yaml").exists()
    for n in names[:2]:
        assert json.loads((sdir / n / "run.json").read_text())["status"] == "done"
        assert (sdir / n / "plots" / "val_accuracy.png").exists()
    assert "data:image/png" in (sdir / "report" / "report.html").read_text()
    assert "| r4 budget=1000 |  |  | 1,668 | 4 | 1000 |" in (sdir / "report" / "results.md").read_text()  # its label

    # again: nothing trains; an unfinished member resumes
    calls = []
    monkeypatch.setattr(sweep.train_lib, "train", lambda cfg, run_dir, resume=False, plots=False: calls.append(
        (Path(run_dir).name, resume)) or {"validation_accuracy": 0.5})
    mtimes = [(sdir / n / "run.json").stat().st_mtime_ns for n in names[:2]]
    sweep.run_sweep(path)
    assert calls == [] and mtimes == [(sdir / n / "run.json").stat().st_mtime_ns for n in names[:2]]
    info = json.loads((sdir / names[0] / "run.json").read_text())
    (sdir / names[0] / "run.json").write_text(json.dumps({**info, "status": "running"}))
    sweep.run_sweep(path)
    assert calls == [(names[0], True)]

    # a changed recipe does not silently reuse the old runs
    path.write_text(path.read_text().replace("name: tiny", "name: tiny\nset: {train.lr: 0.001}"))
    with pytest.raises(UserError, match="holds a run of another config .train.lr"):
        sweep.run_sweep(path)


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
    monkeypatch.setattr(sweep, "_worker_command", lambda: [sys.executable, "-c", FAKE_WORKER])
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
    """The real worker (`python -m lorakd.sweep`): one worker per GPU, the one with two members trains both
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
    assert sweep._gpu_ids(3) == ["0", "1", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7,2")
    assert sweep._gpu_ids(2) == ["5", "7"]
    with pytest.raises(UserError, match="lists only 3"):
        sweep._gpu_ids(4)


def test_sweep_random_dry_run_and_errors(tiny_config, tmp_path):
    path = write_sweep(tmp_path, tiny_config, grid={"model.r": [1, 2, 3], "model.targets": [["query"], "query,value"]},
                       random={"samples": 4, "seed": 1}, out=str(tmp_path / "dry"))
    members = sweep.run_sweep(path, dry_run=True)
    again = sweep.run_sweep(path, dry_run=True)
    assert len(members) == 4 and [m["name"] for m in members] == [m["name"] for m in again]
    assert all(m["name"].startswith("r=") and "_targets=query" in m["name"] for m in members)
    assert not (tmp_path / "dry").exists()  # a dry run writes nothing

    bad = [({"grdi": {}}, "unknown sweep key 'grdi'"),
           ({"grid": {"model.r": 4}}, "grid.model.r: expected a non-empty list"),
           ({"grid": {"model.rank": [4]}}, "member 1 .model.rank=4.: unknown config key model.rank"),
           ({"random": {"samples": 2}}, "no grid"),
           ({"base": "nope.yaml"}, "base 'nope.yaml': no such config file")]
    for spec, msg in bad:
        p = write_sweep(tmp_path / "bad", tiny_config, **spec)
        with pytest.raises(UserError, match=msg) as e:
            sweep.run_sweep(p, dry_run=True)
        assert str(p) in str(e.value)


def test_member_names():
    flats = [{"name": "a", "model.r": 4, "model.alpha": 8.0, "distill.alpha": 0.5, "model.targets": ("query", "value")},
             {"name": "b", "model.r": 8, "model.alpha": 16.0, "distill.alpha": 0.5, "model.targets": ("query", "value")},
             {"name": "c", "model.r": 8, "model.alpha": 16.0, "distill.alpha": 0.9, "model.targets": ("a/b", "c d")}]
    assert sweep.member_names(flats) == ["r=4_model.alpha=8_distill.alpha=0.5_targets=query+value",
                                         "r=8_model.alpha=16_distill.alpha=0.5_targets=query+value",
                                         "r=8_model.alpha=16_distill.alpha=0.9_targets=a-b+c-d"]
    assert sweep.member_names([{"name": "x", "model.r": 4}]) == ["base"]  # nothing differs: the fallback


def test_fit_budget_writes_a_valid_sweep(tmp_path, capsys):
    from lorakd.cli import main

    props = budget.fit_budget(budget=1_000_000, backbone="roberta-base", targets="query,key,value,dense", top=6)
    sweep.write_fit_sweep(tmp_path / "fit.yaml", props, 1_000_000, "roberta-base", 4)
    trainable = [p["trainable"] for p in props]
    spec = yaml.safe_load((tmp_path / "fit.yaml").read_text())
    assert spec["set"]["model.backbone"] == "roberta-base" and len(spec["members"]) == 6
    planned = sweep.run_sweep(tmp_path / "fit.yaml", dry_run=True)  # the written file is a valid sweep
    assert [m["trainable"] for m in planned] == trainable  # count_params agrees with the analytic counts
    main(["fit-budget", "--model", "roberta-base", "--top", "6", "--write", str(tmp_path / "cli.yaml")])
    assert "sweep file: " in capsys.readouterr().out
    assert (tmp_path / "cli.yaml").read_text() == (tmp_path / "fit.yaml").read_text()  # the command writes the same


def test_presets_load_and_count():
    presets = sorted(config.PRESETS.glob("*.yaml"))
    assert len(presets) >= 11
    for p in presets:
        if "teacher" in config.read_yaml(p):
            continue  # a pipeline preset (teacher and student in one file): the pipeline reads those
        cfg = config.load(p)
        tuned = {"minilm-fill": (1e-3, 9), "agnews50k-all": (2e-4, 6), "agnews50k-8791": (1e-3, 3)}
        if p.stem in tuned:  # tuned student recipes: what measured best (the sample's all labels; the 50k regimes)
            assert (cfg.train.lr, cfg.train.epochs) == tuned[p.stem]
        elif cfg.role == "student":
            assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs, cfg.train.schedule, cfg.train.warmup_ratio,
                    cfg.train.weight_decay) == (2e-4, 24, 3, "polynomial", 0.1, 0.01), p.name
    expected = {"roberta-base-r6-qkv": 925_444, "roberta-base-r8-qv": 888_580, "roberta-base-r6-qv": 814_852,
                "roberta-base-layers": 973_828, "agnews-minilm": 84_484, "minilm-layers": 191_620,
                "minilm-fill": 973_060}
    for name, n in expected.items():
        cfg = config.load(config.preset_path(name))
        assert count_params(cfg.model, len(cfg.data.label_names))["trainable"] == n, name
    teacher = config.load(config.preset_path("roberta-base-teacher"))
    assert teacher.role == "teacher" and teacher.model.full_finetune and teacher.train.lr == 2e-5
    for s in sorted(sweep.SWEEPS.glob("*.yaml")):
        members = sweep.run_sweep(s, dry_run=True)
        assert len(members) >= 10 and all(m["status"] != "over budget" for m in members), s.name


@pytest.fixture(autouse=True)
def _no_gpu_env(monkeypatch):
    # children of the parallel test must not see a GPU list from the machine running the tests
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")


def test_sweep_without_data_says_so_before_training(tiny_config, tmp_path):
    path = write_sweep(tmp_path, tiny_config, set={"data.path": ""}, grid={"model.r": [2, 3]},
                       out=str(tmp_path / "out"))
    assert len(sweep.run_sweep(path, dry_run=True)) == 2  # a dry run needs no data
    with pytest.raises(UserError, match="no data.path for the members: pass --data DIR"):
        sweep.run_sweep(path)
    assert not (tmp_path / "out" / "r=2").exists()


def fake_train(calls):
    """train() as far as a sweep sees it: the run folder's config.yaml and a finished run.json."""
    def train(cfg, run_dir, resume=False, plots=False):
        calls.append(Path(run_dir).name)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "config.yaml").write_text(config.to_yaml(cfg))
        (Path(run_dir) / "run.json").write_text(json.dumps({"format": 1, "status": "done", "summary": {}}))
        return {"validation_accuracy": 0.5}
    return train


def test_a_member_added_to_a_sweep_leaves_the_finished_ones_alone(tiny_config, tmp_path, monkeypatch):
    """Names come from the keys that differ across members: a new member that varies a new key renames the
    others, but a member whose config already ran in the sweep folder keeps that folder and is not retrained."""
    calls = []
    monkeypatch.setattr(sweep.train_lib, "train", fake_train(calls))
    monkeypatch.setattr(sweep, "report", lambda *a, **k: None)
    out = tmp_path / "out"
    path = write_sweep(tmp_path, tiny_config, grid={"model.r": [2, 4]}, out=str(out))
    sweep.run_sweep(path)
    assert calls == ["r=2", "r=4"]
    path = write_sweep(tmp_path, tiny_config, grid={"model.r": [2, 4]}, members=[{"model.r": 2, "train.lr": 0.001}],
                       out=str(out))
    members = sweep.run_sweep(path)
    assert [(m["name"], m["status"]) for m in members] == [("r=2", "done"), ("r=4", "done"),
                                                           ("r=2_lr=0.001", "done")]
    assert calls == ["r=2", "r=4", "r=2_lr=0.001"]
    assert sorted(p.name for p in (out / "configs").iterdir()) == ["r=2.yaml", "r=2_lr=0.001.yaml", "r=4.yaml"]


def test_a_sweep_named_like_its_own_files_and_set_keys_blamed_on_set(tiny_config, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep.train_lib, "train", fake_train(calls))
    monkeypatch.setattr(sweep, "report", lambda *a, **k: None)
    path = write_sweep(tmp_path, tiny_config, out=str(tmp_path / "out"))
    path.write_text(path.read_text().replace("name: tiny", "name: configs"))
    members = sweep.run_sweep(path)  # one member, named after the sweep: not the configs/ folder
    assert [m["name"] for m in members] == ["configs-run"] and (tmp_path / "out" / "configs-run" / "run.json").exists()
    for bad in ("foo.bar=1", "model.rank=4", "model.r=abc"):
        with pytest.raises(UserError, match=r"^--set: "):
            sweep.run_sweep(path, dry_run=True, overrides=[bad])
