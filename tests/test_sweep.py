"""Sweeps on the tiny BERT (budget skip, resume, planning, member names), fit-budget's sweep file, presets."""
import json
from pathlib import Path

import pytest
import yaml

from conftest import write_sweep
from lorakd import budget, config, sweep
from lorakd.errors import UserError
from lorakd.budget import count_params
from lorakd.yaml_files import PRESETS, preset_path, read_yaml


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
    presets = sorted(PRESETS.glob("*.yaml"))
    assert len(presets) >= 11
    for p in presets:
        if "teacher" in read_yaml(p):
            continue  # a pipeline preset (teacher and student in one file): the pipeline reads those
        cfg = config.load(p)
        tuned = {"minilm-fill": (1e-3, 9), "agnews50k-all": (1e-3, 3), "agnews50k-8791": (1e-3, 3)}
        if p.stem in tuned:  # tuned student recipes: what measured best (the sample's all labels; the 50k regimes)
            assert (cfg.train.lr, cfg.train.epochs) == tuned[p.stem]
        elif cfg.role == "student":
            assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs, cfg.train.schedule, cfg.train.warmup_ratio,
                    cfg.train.weight_decay) == (2e-4, 24, 3, "polynomial", 0.1, 0.01), p.name
    expected = {"roberta-base-r6-qkv": 925_444, "roberta-base-r8-qv": 888_580, "roberta-base-r6-qv": 814_852,
                "roberta-base-layers": 973_828, "agnews-minilm": 84_484, "minilm-layers": 191_620,
                "minilm-fill": 973_060}
    for name, n in expected.items():
        cfg = config.load(preset_path(name))
        assert count_params(cfg.model, len(cfg.data.label_names))["trainable"] == n, name
    teacher = config.load(preset_path("roberta-base-teacher"))
    assert teacher.role == "teacher" and teacher.model.full_finetune and teacher.train.lr == 2e-5
    for s in sorted(sweep.SWEEPS.glob("*.yaml")):
        members = sweep.run_sweep(s, dry_run=True)
        assert len(members) >= 10 and all(m["status"] != "over budget" for m in members), s.name



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
