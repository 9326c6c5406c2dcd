"""End to end on the tiny random BERT: train, evaluate, predict through the CLI."""
import csv
import json

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
    assert rows[0] == ["ID", "Label"] and [r[0] for r in rows[1:]] == ["7", "9"]
    assert all(r[1] in "0123" for r in rows[1:])
