"""The Python API on the tiny fixtures: each call through `import lorakd`, its result against the files written."""
import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

import lorakd
from lorakd import config as config_lib
from lorakd.errors import UserError
from lorakd.runs import read_eval, read_json
from lorakd.yaml_files import preset_path, read_yaml

QUIET = dict(log=lambda *a, **k: None)
TEXTS = ["election treaty minister", "goal match season coach", "shares profit oil", "nasa linux chip"]


def test_import_lorakd_and_load_config_import_no_torch():
    code = ("import sys, lorakd\n"
            "cfg = lorakd.load_config('agnews-minilm', overrides=['train.epochs=1'])\n"
            "print(cfg.train.epochs, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1.0", "False"]


def test_load_config_layers_a_preset_data_budget_and_overrides(tiny_data):
    preset = read_yaml(preset_path("agnews-minilm"))
    cfg = lorakd.load_config("agnews-minilm", data=tiny_data, budget=50_000, overrides=["model.r=2", "train.lr=1e-3"])
    assert cfg.data.path == str(tiny_data) and cfg.model.budget == 50_000
    assert (cfg.model.r, cfg.train.lr) == (2, 1e-3) and cfg.name == preset["name"]
    assert lorakd.load_config(overrides={"model.targets": ["query"], "train.epochs": 2}).model.targets == ("query",)
    assert lorakd.load_config(overrides="model.r=3").model.r == 3  # one override as a string
    with pytest.raises(UserError, match="unknown config key model.rank"):
        lorakd.load_config(overrides=["model.rank=3"])
    with pytest.raises(UserError, match="no-such-preset: no such config file or preset"):
        lorakd.load_config("no-such-preset")


def test_train_returns_what_the_run_wrote_and_resume_returns_it_again(tiny_config, tmp_path):
    out = tmp_path / "run"
    run = lorakd.train(tiny_config(**{"train.epochs": 1}), out=out, plots=False, **QUIET)
    info, evals = read_json(out / "run.json"), read_eval(out)
    assert run.run_dir == out and info["status"] == "done" and run.summary == info["summary"]
    assert (run.trainable, run.total) == (info["params"]["trainable"], info["params"]["total"])
    assert run.accuracy == evals["validation"]["accuracy"] and run.test_accuracy == evals["test"]["accuracy"]
    assert run.steps == info["summary"]["steps"] > 0 and not (out / "plots").exists()
    logs = []
    assert lorakd.train(resume=out, log=logs.append) == run and logs == [f"{out}: already finished"]
    with pytest.raises(UserError, match="resume takes the run's own config and folder"):
        lorakd.train(tiny_config(), resume=out)
    with pytest.raises(UserError, match="a run already exists here, finished; give another --out"):
        lorakd.train(tiny_config(), out=out, **QUIET)


def test_evaluate_returns_what_eval_json_holds(learned_run, tmp_path):
    run = shutil.copytree(learned_run, tmp_path / "run")  # the shared run's eval.json stays as it was
    ev = lorakd.evaluate(run, "test", **QUIET)
    saved = read_eval(run)["test"]
    assert ev.metrics == saved and (ev.run_dir, ev.split, ev.n) == (run, "test", 80)
    assert (ev.accuracy, ev.macro_f1, ev.loss) == (saved["accuracy"], saved["macro_f1"], saved["loss"])
    with pytest.raises(UserError, match="not a lorakd run folder"):
        lorakd.evaluate(tmp_path, **QUIET)


def test_predict_texts_gives_the_labels_the_file_path_writes(learned_run, tmp_path):
    pred = lorakd.predict(learned_run, TEXTS)
    assert pred.label_names == config_lib.AG_NEWS_LABELS and len(pred) == 4 and pred.probs.shape == (4, 4)
    assert np.allclose(pred.probs.sum(-1), 1, atol=1e-5) and (pred.labels == pred.probs.argmax(-1)).all()
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    res = lorakd.predict_file(learned_run, inp, tmp_path / "p.csv", labels="name", progress=False, **QUIET)
    rows = list(csv.reader(res.out.open()))
    assert res.n == 4 and res.out == tmp_path / "p.csv" and res.device == "cpu"
    assert rows == [["id", "Label"]] + [[f"t{i}", n] for i, n in enumerate(pred.names)]
    one = lorakd.predict(learned_run, TEXTS[1])  # one string is one text
    assert one.labels.tolist() == pred.labels[1:2].tolist() and np.allclose(one.probs, pred.probs[1:2], atol=1e-5)


@pytest.mark.parametrize("texts,said", [([], "no texts to predict"), (["goal match", 3], "texts[1]: text is int"),
                                        (["goal match", "  "], "texts[1]: empty text")])
def test_predict_refuses_bad_texts_in_one_line(learned_run, texts, said):
    with pytest.raises(UserError, match=said.replace("[", r"\[").replace("]", r"\]")):
        lorakd.predict(learned_run, texts)


def test_export_lists_the_files_it_wrote_and_predicts_like_the_run(learned_run, tmp_path):
    ex = lorakd.export(learned_run, tmp_path / "hf", **QUIET)
    assert (ex.out, ex.kind) == (tmp_path / "hf", "merged")
    assert ex.files == {f.name: f.stat().st_size for f in ex.out.iterdir()} and "model.safetensors" in ex.files
    assert json.loads((ex.out / "lorakd.json").read_text())["kind"] == "merged"
    from_run, from_export = lorakd.predict(learned_run, TEXTS), lorakd.predict(ex.out, TEXTS)
    assert (from_run.labels == from_export.labels).all() and np.allclose(from_run.probs, from_export.probs, atol=1e-4)
    ad = lorakd.export(learned_run, tmp_path / "adapter", adapter_only=True, **QUIET)
    assert ad.kind == "adapter" and ad.files == {f.name: f.stat().st_size for f in ad.out.iterdir()}
    assert "adapter_config.json" in ad.files and (lorakd.predict(ad.out, TEXTS).labels == from_run.labels).all()


def test_pipeline_result_is_its_pipeline_json(tiny_config, tmp_path):
    raw = config_lib.to_dict(tiny_config(**{"train.epochs": 1}))
    raw["teacher"] = {"train": {"lr": 3e-3}}
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(raw))
    inp = tmp_path / "in.csv"
    inp.write_text("text\n" + "\n".join(TEXTS) + "\n")
    out = tmp_path / "pipe"
    p = lorakd.pipeline(tmp_path / "pipe.yaml", out=out, overrides=["teacher.train.epochs=2"], predict=inp, **QUIET)
    saved = read_json(out / "pipeline.json")
    assert p.summary == saved and (p.root, p.teacher_dir, p.student_dir) == (out, out / "teacher", out / "student")
    assert p.stages == {"teacher": "trained", "logits": "cached", "student": "trained", "predict": "written"}
    assert p.teacher_accuracy == read_json(out / "teacher" / "run.json")["summary"]["validation_accuracy"]
    assert p.student_accuracy == read_eval(out / "student")["validation"]["accuracy"]
    assert read_json(out / "teacher" / "run.json")["summary"]["steps"] > read_json(out / "student" / "run.json")[
        "summary"]["steps"]  # teacher.train.epochs=2 reached the teacher alone
    assert p.predictions == out / "predictions.csv" and len(list(csv.reader(p.predictions.open()))) == 5
    again = lorakd.pipeline(tmp_path / "pipe.yaml", out=out, overrides=["teacher.train.epochs=2"], predict=inp,
                            **QUIET)
    assert set(again.stages.values()) == {"skipped", "cached"} and again.student_accuracy == p.student_accuracy


def test_the_api_calls_are_still_the_submodules(learned_run):
    """lorakd.train, .predict, ... are the API calls, and still the modules that `from lorakd import X` gives."""
    from lorakd import evaluate, export, pipeline, predict, train

    for module in (train, pipeline, evaluate, predict, export):
        assert getattr(lorakd, module.__name__.rpartition(".")[2]) is module and callable(module)
    assert train.train.__module__ == "lorakd.train" and callable(predict.read_input)
    assert set(lorakd.API) <= set(dir(lorakd))
    with pytest.raises(AttributeError):
        lorakd.no_such_call


def test_the_cli_commands_go_through_the_api(learned_run, tmp_path, monkeypatch):
    """One path: `lorakd eval | predict | export | train | pipeline` call lorakd.api, which does the work."""
    from lorakd import api
    from lorakd.cli import main

    calls = []
    for name in ("evaluate", "predict_file", "export", "train", "pipeline"):
        monkeypatch.setattr(api, name, lambda *a, _name=name, **k: calls.append((_name, a, k)) or
                            api.TrainResult(tmp_path, None, None, 0, 0, 0, 0.0, {}))
    main(["eval", str(learned_run), "--split", "test"])
    main(["predict", str(learned_run), "--input", "in.csv", "--out", "p.csv", "--labels", "name"])
    main(["export", str(learned_run), "--onnx"])
    main(["train", "--config", "agnews-minilm", "--out", "x", "model.r=2"])
    main(["pipeline", "--config", "pipeline-minilm", "--data", "d", "teacher.train.epochs=1"])
    assert [c[0] for c in calls] == ["evaluate", "predict_file", "export", "train", "pipeline"]
    assert calls[0][1:] == ((str(learned_run), "test"), {"device": "auto", "backbone": None})
    assert calls[1][2]["labels"] == "name" and calls[2][2]["onnx"] is True
    assert calls[3][1][0].model.r == 2 and calls[3][1][1] == "x"
    assert calls[4][2] == {"data": "d", "out": None, "overrides": ["teacher.train.epochs=1"], "predict": None,
                            "predict_labels": "index"}
