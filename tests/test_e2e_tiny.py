"""End to end on the tiny random BERT: train, evaluate, predict through the CLI."""
import csv
import json
import platform

import pytest
import torch

from lorakd import train as train_lib
from lorakd.cli import main


def test_train_eval_predict(tiny_config, tmp_path, tiny_data):
    cfg = tiny_config()
    run = tmp_path / "run"
    summary = train_lib.train(cfg, run)
    assert summary["validation_accuracy"] > 0.6  # 4 balanced classes: chance is 0.25
    for f in ["config.yaml", "run.json", "metrics.jsonl", "eval.json", "adapter/adapter_model.safetensors"]:
        assert (run / f).exists(), f
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev) == {"validation", "test"}
    assert ev["validation"]["accuracy"] == summary["validation_accuracy"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "train" for r in records) and any(r["split"] == "validation" for r in records)

    inp = tmp_path / "unlabelled.csv"
    inp.write_text("id,text\n7,election minister treaty\n9,goal match league season\n")
    out = tmp_path / "pred.csv"
    main(["predict", str(run), "--input", str(inp), "--out", str(out)])
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["id", "Label"] and [r[0] for r in rows[1:]] == ["7", "9"]
    assert all(r[1] in "0123" for r in rows[1:])


def test_a_run_evaluates_from_another_folder(tiny_config, tmp_path, tiny_data, monkeypatch):
    """data.path given relative to where training ran: eval from elsewhere still finds the data; a run
    without validation rows (data.val_fraction=0) says so in one line instead of failing in numpy."""
    from lorakd.errors import UserError
    from lorakd.evaluate import evaluate_run

    monkeypatch.chdir(tiny_data.parent)
    train_lib.train(tiny_config(**{"data.path": tiny_data.name, "train.max_steps": 2}), tmp_path / "run",
                    log=lambda *a: None)
    monkeypatch.chdir(tmp_path)
    assert evaluate_run(tmp_path / "run", "validation", log=lambda *a: None)["accuracy"] >= 0
    train_lib.train(tiny_config(**{"data.val_fraction": 0.0, "train.max_steps": 2}), tmp_path / "noval",
                    log=lambda *a: None)
    with pytest.raises(UserError, match="validation split is empty"):
        evaluate_run(tmp_path / "noval", "validation", log=lambda *a: None)


def test_run_json_times_the_phases_a_user_waits_for(tiny_config, tmp_path):
    """summary.phases_s: every phase timed, none negative, the parts within the process's total; plots drawn
    inside train(plots=True) and timed with them."""
    run = tmp_path / "run"
    summary = train_lib.train(tiny_config(**{"train.epochs": 1}), run, log=lambda *a: None, plots=True)
    info = json.loads((run / "run.json").read_text())
    phases = info["summary"]["phases_s"]
    assert phases == summary["phases_s"]
    import peft
    import transformers
    assert info["versions"] == {"python": platform.python_version(), "torch": torch.__version__,
                                "transformers": transformers.__version__, "peft": peft.__version__}
    parts = ("start", "setup", "build", "data", "device", "train_loop", "eval", "files", "plots")
    assert set(parts) <= set(phases) and phases["graph_capture"] == 0.0  # no graphs on the CPU
    assert all(phases[k] >= 0 for k in parts)
    assert phases["train_loop"] >= summary["train_time_s"] * 0.99  # the loop holds the timed steps
    assert sum(phases[k] for k in parts) <= phases["total"] + 0.01  # the total is the phases from lorakd's start
    assert {p.name for p in (run / "plots").iterdir()} == {"train_loss.png", "val_loss.png", "val_accuracy.png"}
    # a second run in the same process (the pipeline's student, a sweep's next member) did not wait for the
    # process's start: its start is 0 and its total is its own phases, not the process's age
    again = train_lib.train(tiny_config(**{"train.epochs": 1}), tmp_path / "again", log=lambda *a: None)
    assert again["phases_s"]["start"] == 0.0
    assert again["phases_s"]["total"] == pytest.approx(sum(again["phases_s"][k] for k in parts[:-1]), abs=0.01)


def test_text_labels_train_and_predict_by_name(tiny_config, tmp_path, capsys):
    """A text,label CSV with positive/negative and no data.label_names: the run keeps the data's classes in its
    config.yaml, and predictions name them."""
    from conftest import make_texts
    from lorakd.runs import load_run

    rows = [(text, ("negative", "positive")[label % 2]) for label, text in make_texts(10, seed=4)]
    data = tmp_path / "reviews.csv"
    with open(data, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    run = tmp_path / "run"
    train_lib.train(tiny_config(**{"data.path": str(data), "train.epochs": 1}), run)
    assert "labels from the data: negative, positive" in capsys.readouterr().out
    assert load_run(run)[0].data.label_names == ("negative", "positive")
    out = tmp_path / "pred.csv"
    main(["predict", str(run), "--input", str(data), "--out", str(out), "--labels", "name", "--scores"])
    got = list(csv.reader(out.open()))
    assert got[0] == ["ID", "Label", "negative", "positive", "Score"]
    assert {r[1] for r in got[1:]} <= {"negative", "positive"}
