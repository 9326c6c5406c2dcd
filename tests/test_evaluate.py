"""Evaluation metrics against a hand-made confusion."""
import pytest
import torch

from lorakd.evaluate import format_table, metrics


def test_metrics_by_hand():
    names = ["a", "b", "c"]
    labels = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 2, 0]
    logits = torch.nn.functional.one_hot(torch.tensor(pred), 3).float() * 5
    m = metrics(logits, labels, names)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class"]["a"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["b"]["recall"] == pytest.approx(1.0)
    f1 = [0.5, 2 * (2 / 3) / (2 / 3 + 1), 2 * 1 * 0.5 / 1.5]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert m["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.tensor(labels)).item())
    table = format_table("validation", m)
    assert "accuracy 0.6667" in table and table.count("\n") == 4
