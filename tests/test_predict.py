"""Predict: input formats, label formats, merged adapters give the same predictions."""
import csv
import pickle

import pandas as pd
import pytest
import torch

from lorakd import data as data_lib
from lorakd import predict as predict_lib
from lorakd.errors import UserError
from lorakd.evaluate import logits_for
from lorakd.predict import merged, predict
from lorakd.runs import open_trained
from lorakd.train import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_backbone, tiny_data):
    from lorakd import config

    cfg = config.load(None, [], {"data.path": str(tiny_data), "model.backbone": str(tiny_backbone), "model.r": 4,
                                 "train.lr": 1e-2, "train.batch_size": 8, "train.epochs": 3, "train.threads": 1,
                                 "data.max_length": 32, "train.checkpoint_every": 0})
    run = tmp_path_factory.mktemp("pred") / "run"
    train(cfg, run, log=lambda *a: None)
    return run


def test_merged_adapters_give_the_same_logits(trained_run):
    cfg, _, model, tok = open_trained(trained_run, torch.device("cpu"))
    store = data_lib.TokenStore(data_lib.encode(tok, ["election treaty war", "goal match", "nasa chip"], 32), None,
                                0, torch.device("cpu"))
    before = logits_for(model, store, 8)
    after = logits_for(merged(model), store, 8)
    assert torch.allclose(before, after, atol=1e-4)


def test_pickle_course_format_and_label_formats(trained_run, tmp_path):
    df = pd.DataFrame({"text": ["election minister", "goal season", "shares profit"]})
    (tmp_path / "test_unlabelled.pkl").write_bytes(pickle.dumps(df))
    out = tmp_path / "p.csv"
    stats = predict(trained_run, tmp_path / "test_unlabelled.pkl", out, log=lambda *a: None)
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["ID", "Label"] and [r[0] for r in rows[1:]] == ["0", "1", "2"] and stats["n"] == 3
    predict(trained_run, tmp_path / "test_unlabelled.pkl", out, label_format="name", log=lambda *a: None)
    assert {r[1] for r in list(csv.reader(out.open()))[1:]} <= {"World", "Sports", "Business", "Sci/Tech"}
    (tmp_path / "list.pkl").write_bytes(pickle.dumps(["nasa linux", "bank oil"]))
    predict(trained_run, tmp_path / "list.pkl", out, label_format="charcnn", log=lambda *a: None)
    assert {r[1] for r in list(csv.reader(out.open()))[1:]} <= {"1", "2", "3", "4"}


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model fails the test: bad input must be refused before the backbone loads."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(predict_lib, "open_trained", refuse)


def test_bad_label_format_fails_fast_and_writes_nothing(trained_run, tmp_path, no_model):
    (tmp_path / "in.csv").write_text("text\ngoal match\n")
    out = tmp_path / "p.csv"
    with pytest.raises(UserError, match="--labels 'names'"):
        predict(trained_run, tmp_path / "in.csv", out, label_format="names", log=lambda *a: None)
    assert not out.exists()


def test_missing_input_fails_fast_and_writes_nothing(trained_run, tmp_path, no_model):
    out = tmp_path / "p.csv"
    with pytest.raises(UserError, match="missing.csv: no such file") as e:
        predict(trained_run, tmp_path / "missing.csv", out, log=lambda *a: None)
    assert "\n" not in str(e.value) and not out.exists()
