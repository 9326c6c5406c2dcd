"""Adapters and the budget: exact parameter counts without weights, placement errors, fit-budget's proposals."""
import pytest

from lorakd import budget
from lorakd import config as config_lib
from lorakd.budget import count_params
from lorakd.cli import main
from lorakd.errors import UserError


@pytest.mark.parametrize("r,targets,trainable", [
    (6, ["query", "key", "value"], 925_444), (8, ["query", "value"], 888_580), (6, ["query", "value"], 814_852)])
def test_reference_roberta_counts(r, targets, trainable):
    c = count_params(config_lib.override(config_lib.Config(), **{"model.backbone": "roberta-base", "model.r": r,
                                                                 "model.alpha": 16, "model.targets": targets}).model, 4)
    assert c["trainable"] == trainable
    if r == 6 and len(targets) == 3:
        assert c["total"] == 125_574_152
        assert {row["module"]: row["params"] for row in c["breakdown"]} == {
            "lora attention.self.query": 110_592, "lora attention.self.key": 110_592,
            "lora attention.self.value": 110_592, "head": 593_668}


def test_layers_restrict_adapters():
    all_layers = count_params(config_lib.override(config_lib.Config(), **{"model.layers": []}).model, 4)
    two = count_params(config_lib.override(config_lib.Config(), **{"model.layers": [0, 5]}).model, 4)
    head = 1540
    assert (two["trainable"] - head) * 3 == all_layers["trainable"] - head


def test_unknown_target_and_layer_name_the_option():
    with pytest.raises(UserError, match="model.targets: no linear module named 'quary'"):
        count_params(config_lib.override(config_lib.Config(), **{"model.targets": ["quary"]}).model, 4)
    with pytest.raises(UserError, match=r"model.layers: layer 6 is out of range .*0..5"):
        count_params(config_lib.override(config_lib.Config(), **{"model.layers": [0, 6]}).model, 4)


def test_full_finetune_counts_everything():
    c = count_params(config_lib.override(config_lib.Config(), **{"model.full_finetune": True}).model, 4)
    assert c["trainable"] == c["total"]


def test_params_command_prints_reference_figures(capsys):
    main(["params", "--model", "roberta-base", "--r", "6", "--alpha", "16", "--targets", "query,key,value"])
    out = capsys.readouterr().out
    assert "trainable 925,444 of 125,574,152" in out and "lora attention.self.query" in out
    main(["params", "--model", "roberta-base", "--budget", "900000"])  # as train takes it
    assert "budget 900,000: OVER" in capsys.readouterr().out


def test_mpnet_counts_without_weights():
    """embedded:mpnet's architecture is known: counts need neither the weights nor the parts installed."""
    c = count_params(
        config_lib.override(config_lib.Config(), **{"model.backbone": "embedded:mpnet", "model.targets": ["q", "k", "v"]}).model, 4)
    assert c["trainable"] == 925_444 and c["total"] == 110_414_984


def test_fit_budget_exact(capsys):
    props = budget.fit_budget(budget=1_000_000, backbone="roberta-base", targets="query,key,value,dense", top=6)
    trainable = [p["trainable"] for p in props]
    assert trainable == sorted(trainable, reverse=True) and all(t <= 1_000_000 for t in trainable)
    assert "% budget" in capsys.readouterr().out

    # the reference placements, and the BERT pooler that 'dense' on every layer also wraps
    all_props = budget.propose(1_000_000, "roberta-base", ["query", "key", "value"])
    qkv = next(p for p in all_props if p["targets"] == ("query", "key", "value") and p["layers"] == ())
    assert (qkv["r"], qkv["trainable"]) == (7, 980_740)  # r=6 is 925,444; r=7 the largest that fits
    for backbone, targets in (("embedded:minilm", ["dense", "value"]), ("roberta-base", ["query", "output.dense"])):
        for p in budget.propose(1_000_000, backbone, targets, min_r=2)[::3]:
            mc = config_lib.load(None, [], {"model.backbone": backbone, "model.r": p["r"],
                                            "model.targets": list(p["targets"]), "model.layers": list(p["layers"])}).model
            assert count_params(mc, 4)["trainable"] == p["trainable"], p

    with pytest.raises(UserError, match="no linear module named 'qeury'"):
        budget.fit_budget(budget=10**6, backbone="roberta-base", targets="qeury")
    with pytest.raises(UserError, match="head alone"):
        budget.fit_budget(budget=1000, backbone="roberta-base")


def test_proposals_stay_within_each_matrix_rank():
    """MiniLM's matrices are 384 wide: one module at r 650 would fill the budget and add no capacity."""
    props = budget.propose(1_000_000, "embedded:minilm", ["query", "key", "value", "dense"])
    assert props and max(p["r"] for p in props) == 384
    assert all(p["trainable"] <= 1_000_000 for p in props)


def test_fit_budget_max_r_caps_proposals(capsys):
    main(["fit-budget", "--budget", "1000000", "--max-r", "3", "--top", "10"])
    rows = capsys.readouterr().out.splitlines()[2:]  # after the title and the column header
    assert len(rows) == 10 and max(int(r.split()[0]) for r in rows) == 3  # uncapped, these ranks reach 325
    with pytest.raises(SystemExit) as exc:
        main(["fit-budget", "--min-r", "4", "--max-r", "2"])
    err = capsys.readouterr().err.splitlines()
    assert exc.value.code == 2 and err == ["lorakd: error: --max-r 2: must be >= --min-r 4"]


def test_one_head_and_one_budget_rule():
    """The head is classifier or score wherever it sits (BERT's classifier, RoBERTa's classifier.dense, a
    decoder's score, peft's copies); the budget binds a student's adapters only."""
    for name in ("classifier", "classifier.dense", "score", "base_model.model.score.modules_to_save.default.weight"):
        assert budget.is_head(name), name
    for name in ("bert.pooler.dense", "roberta.encoder.layer.0.attention.self.query", "pre_classifier"):
        assert not budget.is_head(name), name
    student = config_lib.override(config_lib.Config(), **{"model.budget": 1000})
    assert budget.budget_applies(student) and budget.over_budget(student, 1001) and not budget.over_budget(student, 1000)
    for free in ({"role": "teacher"}, {"model.budget": 0}, {"model.full_finetune": True}):
        cfg = config_lib.override(student, **free)
        assert not budget.budget_applies(cfg) and not budget.over_budget(cfg, 10**9), free
        budget.check_budget(cfg, {"trainable": 10**9})  # no error
    with pytest.raises(UserError, match="1,001 trainable parameters exceed the budget of 1,000"):
        budget.check_budget(student, {"trainable": 1001})

