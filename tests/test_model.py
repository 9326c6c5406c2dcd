"""Model: exact parameter counts without weights, placement errors, backbone identity."""
import pytest

from lorakd import config as config_lib
from lorakd.cli import main
from lorakd.errors import UserError
from lorakd.model import backbone_config, backbone_fingerprint, count_params, resolve_backbone


def counts(**model):
    return count_params(config_lib.override(config_lib.Config(), **{f"model.{k}": v for k, v in model.items()}), 4)


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


def test_counts_match_a_real_model(tiny_backbone):
    """The meta-device count equals the parameters of the model actually built with weights."""
    from lorakd.model import build, summarize_params

    cfg = config_lib.override(config_lib.Config(), **{"model.backbone": str(tiny_backbone), "model.r": 3,
                                                      "model.targets": ["query", "dense"], "model.layers": [1]})
    assert count_params(cfg.model, 4) == summarize_params(build(cfg.model, 4))


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


def test_embedded_backbone_resolves_to_the_package_folder():
    assert (resolve_backbone("embedded:minilm") + "/config.json").endswith("model/config.json")
    with pytest.raises(UserError, match="no such model folder"):
        resolve_backbone("./nowhere")


def test_fingerprint_tells_architectures_apart():
    assert backbone_fingerprint(backbone_config("roberta-base", 4)) != backbone_fingerprint(
        backbone_config("bert-base-uncased", 4))
    assert backbone_fingerprint(backbone_config("roberta-base", 4)) == backbone_fingerprint(
        backbone_config("roberta-base", 2))


def test_params_command_prints_reference_figures(capsys):
    main(["params", "--model", "roberta-base", "--r", "6", "--alpha", "16", "--targets", "query,key,value"])
    out = capsys.readouterr().out
    assert "trainable 925,444 of 125,574,152" in out and "lora attention.self.query" in out
