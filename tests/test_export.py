"""Export: the HF folder, the peft adapter folder, ONNX fp32 and int8 all predict what the run predicts."""
import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import make_texts
from lorakd import backbones
from lorakd.cli import main
from lorakd.errors import UserError
from lorakd.export import export, portable_base
from lorakd.predict import predict

NAMES = ["World", "Sports", "Business", "Sci/Tech"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """200 unlabelled texts, some longer than max_length (32 tokens) so truncation is exercised."""
    rows = make_texts(40, seed=7)
    out = [t for _, t in rows] + [" ".join(t for _, t in rows[i: i + 4]) for i in range(0, 160, 4)]
    path = tmp_path_factory.mktemp("texts") / "in.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([f"t{i}", t] for i, t in enumerate(out))
    return out, path


@pytest.fixture(scope="module")
def exported(learned_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("out")
    hf = export(learned_run, root / "hf", onnx=True, log=lambda *a: None)
    peft = export(learned_run, root / "adapter", adapter_only=True, log=lambda *a: None)
    return root / "hf", root / "adapter", hf, peft


def labels_of(path):
    return [row[1] for row in list(csv.reader(open(path)))[1:]]


def lorakd_labels(model, inp, out, **kw):
    predict(model, inp, out, label_format="name", progress=False, log=lambda *a: None, **kw)
    return labels_of(out)


def test_hf_folder_loads_with_plain_transformers_and_predicts_like_the_run(learned_run, exported, texts, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    hf, _, result, _ = exported
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "model.onnx",
            "model.int8.onnx"} <= set(result["files"])
    want = lorakd_labels(learned_run, texts[1], tmp_path / "run.csv")
    model = AutoModelForSequenceClassification.from_pretrained(hf).eval()
    assert model.config.id2label == dict(enumerate(NAMES))
    assert model.config.label2id == {n: i for i, n in enumerate(NAMES)}
    tok = AutoTokenizer.from_pretrained(hf)
    assert tok.model_max_length == 32  # the run's data.max_length travels with the tokenizer
    with torch.inference_mode():
        enc = tok(texts[0], padding=True, truncation=True, return_tensors="pt")
        got = [model.config.id2label[i] for i in model(**enc).logits.argmax(-1).tolist()]
    assert got == want
    clf = pipeline("text-classification", model=str(hf), device="cpu")
    assert [r["label"] for r in clf(texts[0], truncation=True, batch_size=16)] == want
    assert lorakd_labels(hf, texts[1], tmp_path / "hf.csv") == want


def test_adapter_folder_loads_with_plain_peft_and_predicts_like_the_run(learned_run, exported, texts, tmp_path,
                                                                       tiny_backbone):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    _, adapter, _, result = exported
    assert {"adapter_config.json", "adapter_model.safetensors", "lorakd.json", "README.md"} <= set(result["files"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_backbone.resolve())  # a local folder: its absolute path
    id2label = {int(i): n for i, n in json.loads((adapter / "lorakd.json").read_text())["id2label"].items()}
    assert id2label == dict(enumerate(NAMES))
    want = lorakd_labels(learned_run, texts[1], tmp_path / "run.csv")
    model = AutoPeftModelForSequenceClassification.from_pretrained(adapter, id2label=id2label).eval()
    tok = AutoTokenizer.from_pretrained(adapter)
    with torch.inference_mode():
        enc = tok(texts[0], padding=True, truncation=True, return_tensors="pt")
        got = [model.config.id2label[i] for i in model(**enc).logits.argmax(-1).tolist()]
    assert got == want
    assert lorakd_labels(adapter, texts[1], tmp_path / "adapter.csv") == want


def test_onnx_fp32_matches_and_int8_agrees(learned_run, exported, texts, tmp_path):
    hf = exported[0]
    want = lorakd_labels(learned_run, texts[1], tmp_path / "run.csv")
    assert lorakd_labels(hf / "model.onnx", texts[1], tmp_path / "fp32.csv") == want
    int8 = lorakd_labels(hf / "model.int8.onnx", texts[1], tmp_path / "int8.csv", batch_size=4, threads=2)
    assert np.mean([a == b for a, b in zip(int8, want)]) >= 0.95
    assert labels_of(tmp_path / "int8.csv") and [r[0] for r in csv.reader(open(tmp_path / "int8.csv"))][1:4] == \
        ["t0", "t1", "t2"]


def test_onnx_prediction_tokenises_like_autotokenizer_without_importing_torch(exported, texts, tmp_path):
    from transformers import AutoTokenizer

    from lorakd import data as data_lib
    from lorakd.predict import onnx_tokenizer

    hf = exported[0]
    want, tok = AutoTokenizer.from_pretrained(hf), onnx_tokenizer(hf)
    assert (tok.pad_token_id, tok.model_max_length) == (want.pad_token_id, want.model_max_length)
    some = texts[0] + ["", "  x  ", "word " * 400]  # empty, blank, and cut at max_length
    assert [list(e) for e in data_lib.encode(tok, some, 32)] == [list(e) for e in data_lib.encode(want, some, 32)]
    # a fresh process: the ONNX path loads no torch and no transformers (seconds of imports)
    code = ("import sys; from lorakd.predict import predict; "
            f"predict({str(hf / 'model.onnx')!r}, {str(texts[1])!r}, {str(tmp_path / 'p.csv')!r}, label_format='name', log=print); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    assert labels_of(tmp_path / "p.csv") == lorakd_labels(hf / "model.onnx", texts[1], tmp_path / "again.csv")


def test_openvino_runs_the_fp32_export_with_onnxruntimes_logits_and_the_runs_labels(learned_run, exported, texts,
                                                                                        tmp_path):
    pytest.importorskip("openvino")
    from lorakd.predict import onnx_session, openvino_runner

    hf = exported[0]
    ids = np.array([[0, 5, 9, 11, 2, 1, 1, 1], [0, 7, 3, 2, 1, 1, 1, 1]], dtype=np.int64)
    mask = (ids != 1).astype(np.int64)
    want = onnx_session(hf / "model.onnx").run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    run, precision = openvino_runner(hf / "model.onnx", 2, precision="f32")
    assert precision == "f32"
    np.testing.assert_allclose(run(ids, mask), want, atol=1e-4)
    # the export folder: OpenVINO takes its fp32 graph (bf16 where the CPU has AMX), streams on 2 threads
    run_labels = lorakd_labels(learned_run, texts[1], tmp_path / "run.csv")
    ov = lorakd_labels(hf, texts[1], tmp_path / "ov.csv", runtime="openvino", threads=2)
    assert np.mean([a == b for a, b in zip(ov, run_labels)]) >= 0.98
    assert [r[0] for r in csv.reader(open(tmp_path / "ov.csv"))][1:4] == ["t0", "t1", "t2"]


def test_openvino_refuses_what_it_cannot_run(learned_run, exported, texts, tmp_path, capsys):
    pytest.importorskip("openvino")
    with pytest.raises(UserError, match="runs an ONNX model: export it first"):
        predict(learned_run, texts[1], tmp_path / "p.csv", runtime="openvino", log=lambda *a: None)
    with pytest.raises(UserError, match="--runtime 'tensorrt'"):
        predict(exported[0], texts[1], tmp_path / "p.csv", runtime="tensorrt", log=lambda *a: None)
    broken = tmp_path / "broken"  # a graph OpenVINO cannot read: one line naming it, no output written
    shutil.copytree(exported[0], broken, ignore=shutil.ignore_patterns("*.onnx", "*.safetensors"))
    (broken / "model.onnx").write_bytes(b"not an ONNX graph")
    with pytest.raises(UserError, match="OpenVINO cannot run this graph"):
        predict(broken / "model.onnx", texts[1], tmp_path / "p.csv", runtime="openvino", log=lambda *a: None)
    with pytest.raises(SystemExit) as stop:
        main(["predict", str(learned_run), "--input", str(texts[1]), "--out", str(tmp_path / "p.csv"),
              "--runtime", "openvino"])
    assert stop.value.code == 2
    assert "export it first" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def test_model_card_states_data_recipe_counts_and_figures(learned_run, exported):
    card = (exported[0] / "README.md").read_text()
    info = json.loads((learned_run / "run.json").read_text())
    evals = json.loads((learned_run / "eval.json").read_text())
    for fragment in ["World", "Sci/Tech", "r=4", "lr 0.01", "batch 8", f"{info['params']['trainable']:,}",
                     f"{evals['validation']['accuracy']:.4f}", f"{evals['test']['accuracy']:.4f}", "pipeline(",
                     "model.int8.onnx", "--runtime openvino", "Distillation: none"]:
        assert fragment in card, fragment
    adapter_card = (exported[1] / "README.md").read_text()
    assert "AutoPeftModelForSequenceClassification" in adapter_card and "id2label" in adapter_card


def test_adapter_with_embedded_base_is_resolved_by_lorakd(learned_run, exported, texts, tmp_path, monkeypatch,
                                                          tiny_backbone):
    """An adapter naming embedded:minilm: lorakd resolves the name when it loads (here onto the tiny backbone)."""
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(exported[1], adapter)
    cfg_path = adapter / "adapter_config.json"
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), base_model_name_or_path=backbones.EMBEDDED)))
    real = backbones.resolve_backbone
    monkeypatch.setattr(backbones, "resolve_backbone",
                        lambda name: str(tiny_backbone) if name == backbones.EMBEDDED else real(name))
    want = lorakd_labels(learned_run, texts[1], tmp_path / "run.csv")
    assert lorakd_labels(adapter, texts[1], tmp_path / "a.csv") == want


def test_portable_base_names():
    assert portable_base("embedded:minilm") == "embedded:minilm"
    assert portable_base("FacebookAI/roberta-base") == "FacebookAI/roberta-base"


def test_cli_export_replaces_an_earlier_export_and_refuses_other_folders(learned_run, tmp_path, capsys):
    out = tmp_path / "exp"
    main(["export", str(learned_run), "--out", str(out), "--adapter-only"])
    main(["export", str(learned_run), "--out", str(out)])  # an earlier export is replaced whole
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        main(["export", str(learned_run), "--out", str(other)])
    assert e.value.code == 2 and "not a lorakd export" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"


def test_export_refuses_unfinished_runs_and_bad_combinations(learned_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(learned_run, run)
    with pytest.raises(UserError, match="drop --onnx"):
        export(run, tmp_path / "x", adapter_only=True, onnx=True, log=lambda *a: None)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(dict(info, status="running")))
    with pytest.raises(UserError, match="has not finished"):
        export(run, tmp_path / "x", log=lambda *a: None)
    assert not (tmp_path / "x").exists()


def test_export_carries_no_local_paths(learned_run, exported, tiny_data):
    hf, adapter = exported[0], exported[1]
    for folder in (hf, adapter):
        card, meta = (folder / "README.md").read_text(), json.loads((folder / "lorakd.json").read_text())
        assert str(learned_run.resolve()) not in card + json.dumps(meta)
        assert str(tiny_data.resolve()) not in card  # the data path is its folder name only, said to be local
        assert f"`{tiny_data.name}` (a local file or folder)" in card
        assert meta["run"] == learned_run.name


def test_scores_of_an_onnx_export_match_the_run(learned_run, exported, texts, tmp_path):
    """--scores works for every model kind: the ONNX model's probabilities (softmax of its logits) are the run's."""
    got = {}
    for name, model in (("run", learned_run), ("onnx", exported[0] / "model.onnx")):
        predict(model, texts[1], tmp_path / f"{name}.csv", scores=True, progress=False, log=lambda *a: None)
        rows = list(csv.reader(open(tmp_path / f"{name}.csv")))
        assert rows[0] == ["id", "Label", *NAMES, "Score"]
        got[name] = np.array([[float(v) for v in r[2:]] for r in rows[1:]])
    assert np.allclose(got["run"], got["onnx"], atol=1e-3)
