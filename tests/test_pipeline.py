"""The one-command pipeline on the tiny backbone: stages run once, then are skipped."""
import csv
import json

import pytest
import yaml

from lorakd import config as config_lib
from lorakd.errors import UserError
from lorakd.pipeline import run_pipeline
from lorakd.runs import read_metrics
from lorakd.yaml_files import read_yaml


def test_pipeline_runs_then_skips(tiny_config, tmp_path):
    raw = config_lib.to_dict(tiny_config(**{"train.epochs": 3}))
    raw["teacher"] = {"train": {"lr": 3e-3, "epochs": 3}}
    cfg_path = tmp_path / "pipe.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "text": "election treaty"}\n{"id": "b", "text": "nasa linux chip"}\n')
    out = tmp_path / "pipe"
    logs = []
    s = run_pipeline(cfg_path, out=out, predict_input=inp, log=logs.append)
    assert s["stages"] == {"teacher": "trained", "logits": "cached", "student": "trained", "predict": "written"}
    teacher_cfg = config_lib.from_dict(read_yaml(out / "teacher" / "config.yaml"))
    assert teacher_cfg.role == "teacher" and teacher_cfg.model.full_finetune and teacher_cfg.train.lr == 3e-3
    student_cfg = config_lib.from_dict(read_yaml(out / "student" / "config.yaml"))
    assert student_cfg.distill.teachers == (str(out / "teacher"),)
    assert list((out / "teacher" / "logits").glob("*.pt"))
    train_records = [r for r in read_metrics(out / "student") if r["split"] == "train"]
    assert all("ce" in r and "kd" in r for r in train_records)  # both parts of the loss recorded
    assert any("from cache" in str(line) for line in logs)  # the student ran no teacher forward
    rows = list(csv.reader((out / "predictions.csv").open()))
    assert rows[0] == ["id", "Label"] and [r[0] for r in rows[1:]] == ["a", "b"]

    s2 = run_pipeline(cfg_path, out=out, predict_input=inp, log=lambda *a: None)
    assert s2["stages"] == {"teacher": "skipped", "logits": "cached", "student": "skipped", "predict": "skipped"}
    s3 = run_pipeline(cfg_path, out=out, predict_input=inp, predict_labels="name", log=lambda *a: None)
    assert s3["stages"]["predict"] == "written"  # another label format: predicted again, with class names
    assert {r[1] for r in list(csv.reader((out / "predictions.csv").open()))[1:]} <= set(student_cfg.data.label_names)
    with pytest.raises(UserError, match="--predict-labels 'names': expected one of index, name, charcnn"):
        run_pipeline(cfg_path, out=out, predict_input=inp, predict_labels="names", log=lambda *a: None)
    assert json.loads((out / "pipeline.json").read_text())["stages"]["student"] == "skipped"

    # a LoRA key reaches the full-FT teacher too, which does not use it: the teacher stays done; the student
    # it changes is refused with the key named
    logs = []
    with pytest.raises(UserError, match=r"student: holds a run of another config \(model.r: 4 there, 8 now\)"):
        run_pipeline(cfg_path, out=out, overrides=["model.r=8"], log=logs.append)
    assert any("[teacher] done already" in line for line in logs)


def test_params_counts_a_pipeline_presets_student_and_names_its_teacher(capsys):
    """`lorakd params --preset pipeline-minilm`: the student's exact count (the reference shape on MiniLM) and the
    teacher's, instead of refusing the `teacher:` section."""
    from lorakd.cli import main

    main(["params", "--preset", "pipeline-minilm"])
    out = capsys.readouterr().out
    assert "trainable 84,484 of 22,799,240" in out
    assert "budget 1,000,000: within" in out
    assert "teacher (pipeline): embedded:minilm, full fine-tune: trainable 22,714,756 of 22,714,756" in out


def test_a_bad_predict_input_fails_before_anything_trains(tiny_config, tmp_path):
    cfg_path = tmp_path / "pipe.yaml"
    cfg_path.write_text(yaml.safe_dump(config_lib.to_dict(tiny_config())))
    dup = tmp_path / "dup.csv"
    dup.write_text("id,text\n1,election treaty\n1,nasa linux chip\n")
    logs = []
    for bad, why in ((tmp_path / "missing.csv", "missing.csv"), (dup, "duplicate ID")):
        with pytest.raises(UserError, match=why):
            run_pipeline(cfg_path, out=tmp_path / "pipe", predict_input=bad, log=logs.append)
    assert not (tmp_path / "pipe").exists()
    assert "no teacher: section, so the teacher (a full fine-tune) trains with the student's train keys" in logs[0]


def test_pipeline_teacher_rounds_and_ensembles(tiny_config, tmp_path):
    """distill.teacher_rounds=2, teacher_ensemble=2: round 1's two seeds learn from labels; round 2's two learn
    from the labels plus round 1's averaged targets over the transfer rows; the student from round 2's. Every
    round keeps its logits in its own cache; a rerun trains nothing."""
    raw = config_lib.to_dict(tiny_config(**{"train.epochs": 1, "data.labelled": 60}))
    raw["distill"].update({"teacher_rounds": 2, "teacher_ensemble": 2, "round_augment": 1})
    raw["teacher"] = {"train": {"lr": 3e-3, "epochs": 1}}
    cfg_path = tmp_path / "pipe.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "pipe"
    s = run_pipeline(cfg_path, out=out, log=lambda *a: None)
    assert s["teachers"] == [[str(out / "teacher"), str(out / "teacher-r1-2")],
                             [str(out / "teacher-r2-1"), str(out / "teacher-r2-2")]]
    load = lambda name: config_lib.from_dict(read_yaml(out / name / "config.yaml"))  # noqa: E731
    first, second = load("teacher"), load("teacher-r1-2")
    assert first.distill.teachers == () and second.train.seed == first.train.seed + 1
    assert second.data.split_seed == first.train.seed  # every member sees the same validation rows
    r2 = load("teacher-r2-2")
    assert r2.distill.teachers == (str(out / "teacher"), str(out / "teacher-r1-2")) and r2.distill.augment == 1
    assert load("student").distill.teachers == (str(out / "teacher-r2-1"), str(out / "teacher-r2-2"))
    for name in ("teacher", "teacher-r1-2", "teacher-r2-1", "teacher-r2-2"):
        assert (out / name / "eval.json").exists()
    for name in ("teacher", "teacher-r1-2"):  # round 1's logits over round 2's rows, and the student's
        assert list((out / name / "logits").glob("*.pt"))
    assert list((out / "teacher-r2-1" / "logits").glob("*.pt"))
    again = run_pipeline(cfg_path, out=out, log=lambda *a: None)["stages"]
    assert {k: v for k, v in again.items() if k != "logits"} == dict.fromkeys(
        ["teacher", "teacher-r1-2", "teacher-r2-1", "teacher-r2-2", "student"], "skipped")


def test_pipeline_and_sweep_take_text_labels_from_the_data(tiny_config, tmp_path):
    """Text labels and no data.label_names: both stages and every sweep member keep the data's classes, and a
    second call finds its runs done (their configs match)."""
    from conftest import make_texts
    from lorakd import sweep

    rows = [(text, ("negative", "positive")[label % 2]) for label, text in make_texts(10, seed=4)]
    data = tmp_path / "reviews.csv"
    with open(data, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    raw = config_lib.to_dict(tiny_config(**{"data.path": str(data), "train.max_steps": 2}))
    raw["data"].pop("label_names")
    raw["teacher"] = {"train": {"max_steps": 2}}
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(raw))
    for _ in range(2):
        s = run_pipeline(tmp_path / "pipe.yaml", out=tmp_path / "pipe", log=lambda *a: None)
    assert s["stages"]["teacher"] == s["stages"]["student"] == "skipped"
    student = config_lib.from_dict(read_yaml(tmp_path / "pipe" / "student" / "config.yaml"))
    assert student.data.label_names == ("negative", "positive")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({k: v for k, v in raw.items() if k != "teacher"}))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": "t", "base": "base.yaml", "grid": {"model.r": [2]},
                                                         "out": str(tmp_path / "sweep")}))
    for _ in range(2):
        members = sweep.run_sweep(tmp_path / "sweep.yaml")
    assert members[0]["cfg"].data.label_names == ("negative", "positive")


def test_later_rounds_take_their_own_ensemble_size_and_epochs(tiny_config, tmp_path):
    """distill.round_ensemble and round_epochs: round 1 averages two teachers, round 2 is one teacher that
    trains round_epochs over the labels plus round 1's targets (the 50k preset pipeline-50k-8791)."""
    from lorakd.pipeline import round_config, teacher_names

    student = tiny_config(**{"distill.teacher_rounds": 2, "distill.teacher_ensemble": 2,
                             "distill.round_ensemble": 1, "distill.round_epochs": 3, "train.epochs": 1})
    assert teacher_names(student) == [["teacher", "teacher-r1-2"], ["teacher-r2"]]
    previous = [tmp_path / "teacher", tmp_path / "teacher-r1-2"]
    r2 = round_config(student, student, 0, previous)
    assert r2.train.epochs == 3 and r2.distill.teachers == tuple(map(str, previous))
    assert round_config(student, student, 1, []).train.epochs == 1  # round 1 keeps the teacher's own epochs
    same = tiny_config(**{"distill.teacher_rounds": 2, "distill.teacher_ensemble": 2})
    assert teacher_names(same)[1] == ["teacher-r2-1", "teacher-r2-2"]  # 0: as many as round 1
    with pytest.raises(UserError, match="distill.round_epochs"):
        tiny_config(**{"distill.round_epochs": -1})
