"""Inference: a trained model opened one way (run or exported folder), its precision, its pad id, its logits."""
import shutil
from types import SimpleNamespace as NS

import torch

from lorakd import config as config_lib
from lorakd import data as data_lib
from lorakd import inference
from lorakd import model as model_lib
from lorakd.graphs import merged
from lorakd.inference import TrainedModel, logits_for, open_folder, open_run
from lorakd.predict import OnnxModel
from lorakd.runs import load_run

CPU = torch.device("cpu")
TEXTS = ["election treaty war", "goal match", "nasa chip", "shares profit bank oil", "the", "linux space software"]


def test_merged_adapters_give_the_same_logits(learned_run):
    opened = open_run(learned_run, CPU, merge=False)
    model, tok = opened.model, opened.tok
    store = data_lib.TokenStore(data_lib.encode(tok, ["election treaty war", "goal match", "nasa chip"], 32), None,
                                0, CPU)
    before = logits_for(model, store, 8)
    after = logits_for(merged(model), store, 8)
    assert torch.allclose(before, after, atol=1e-4)


def test_a_run_opens_merged_in_eval_mode_with_the_logits_of_the_unmerged_model(learned_run, monkeypatch):
    """The object's logits are what the old path gave (the adapter unmerged over a TokenStore), in the texts'
    order, whatever the chunk size."""
    trained = open_run(learned_run, CPU)
    cfg, _ = load_run(learned_run)
    assert (trained.cfg, trained.info["status"], trained.max_length, trained.device) == (cfg, "done", 32, CPU)
    assert not hasattr(trained.model, "merge_and_unload") and not trained.model.training
    old = model_lib.load_trained(cfg, learned_run, 4).eval()
    store = data_lib.TokenStore(data_lib.encode(trained.tok, TEXTS, 32), None, trained.tok.pad_token_id or 0, CPU)
    want = logits_for(old, store, 4)
    got = trained.logits(TEXTS, 4)
    assert got.dtype == torch.float32 and got.shape == (len(TEXTS), 4)
    assert torch.allclose(got, want, atol=1e-4)
    monkeypatch.setattr(inference, "CHUNK", 4)  # two chunks: the same rows, in order
    assert torch.allclose(trained.logits(TEXTS, 2), got, atol=1e-5)


def test_under_torchrun_each_process_computes_its_rows_and_gathers(learned_run, monkeypatch):
    trained = open_run(learned_run, CPU)
    full = trained.logits(TEXTS, 8)
    gathered = []
    monkeypatch.setattr(inference.dist, "env", lambda: (1, 2, 1))  # rank 1 of 2
    monkeypatch.setattr(inference.dist, "init", lambda device, world: None)
    monkeypatch.setattr(inference.dist, "gather_rows",
                        lambda part, rows, n, world, device: gathered.append((part, rows, n)) or part)
    trained.logits(TEXTS, 8)
    (part, rows, n), = gathered
    assert n == len(TEXTS) and list(rows) == [1, 3, 5]
    assert torch.allclose(part, full[rows], atol=1e-5)


def test_one_precision_rule_frozen_weights_in_the_amp_dtype(learned_run, tmp_path):
    """A bf16 run opens with every weight frozen in bf16, the head too; fp32 (export's, and a CPU's under
    precision auto) keeps every weight fp32."""
    run = tmp_path / "run"
    shutil.copytree(learned_run, run)
    cfg, _ = load_run(run)
    (run / "config.yaml").write_text(config_lib.to_yaml(config_lib.override(cfg, **{"train.precision": "bf16"})))
    bf16 = open_run(run, CPU)
    assert bf16.amp == torch.bfloat16
    assert {(p.dtype, p.requires_grad) for p in bf16.model.parameters()} == {(torch.bfloat16, False)}
    fp32 = open_run(run, CPU, precision="fp32")
    assert fp32.amp is None and {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    assert open_run(learned_run, CPU).amp is None  # precision auto on a CPU
    assert torch.allclose(bf16.logits(TEXTS, 8), fp32.logits(TEXTS, 8), atol=0.1)


def test_one_pad_id_rule_for_every_model():
    """The tokenizer's pad id, else 0: a run's or exported model and an ONNX model pad alike."""
    for pad, want in ((None, 0), (0, 0), (5, 5)):
        tok = NS(pad_token_id=pad)
        assert data_lib.pad_id(tok) == want
        assert TrainedModel(None, None, None, tok, CPU, None, 8).pad_id == want
        assert OnnxModel(tok, 8, None, 1, "cpu").pad_id == want


def test_an_exported_folder_opens_with_the_runs_logits(learned_run, tmp_path):
    from lorakd.export import export

    export(learned_run, tmp_path / "hf", log=lambda *a: None)
    folder = open_folder("hf", tmp_path / "hf", CPU)
    assert (folder.cfg, folder.info, folder.max_length, folder.amp) == (None, None, 32, None)
    assert torch.allclose(folder.logits(TEXTS, 8), open_run(learned_run, CPU).logits(TEXTS, 8), atol=1e-4)
