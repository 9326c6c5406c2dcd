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


def test_outlier_channels_leave_int8_with_the_same_function(tiny_backbone):
    """A feed-forward channel 50x the others (as BERT's have) is routed around int8; fp32 logits are unchanged."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorakd.export import _split_outliers

    model = AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=4).eval()
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    inter = model.bert.encoder.layer[0].intermediate.dense
    inter.weight.data[3] *= 50
    inter.bias.data[3] = 30.0
    enc = tok(["election war peace", "goal match season coach league"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        before = model(**enc).logits
        assert _split_outliers(model, tok) >= 1
        assert torch.allclose(model(**enc).logits, before, atol=1e-5)
    assert type(model.bert.encoder.layer[0].intermediate).__name__ == "Up"
    assert type(model.bert.encoder.layer[0].output.dense).__name__ == "Down"
    # 64 channels, 1 outsized: the next largest go with it so that int8 keeps a multiple of 16 (aligned rows)
    assert model.bert.encoder.layer[0].intermediate.int8.out_features == 48
    assert torch.equal(model.bert.encoder.layer[0].intermediate.fp32.weight[0], inter.weight[3])  # largest first


def test_last_layer_on_the_first_token_gives_the_same_logits(tiny_backbone):
    """The ONNX graph runs the last layer for the first token only: same logits on a padded batch."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorakd.export import _first_token_only, _split_outliers

    model = AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=4).eval()
    model.set_attn_implementation("eager")
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    enc = tok(["election war peace", "goal match season coach league final", "chip"], padding=True,
              return_tensors="pt")
    with torch.inference_mode():
        before = model(**enc).logits
        assert _first_token_only(model)
        assert torch.allclose(model(**enc).logits, before, atol=1e-5)
        _split_outliers(model, tok, ratio=1.5)  # both rewrites together, as the export applies them
        assert torch.allclose(model(**enc).logits, before, atol=1e-5)


def test_products_on_one_row_per_text_stay_fp32():
    """With the first-token last layer, its products (but keys and values) and the head's are not quantised."""
    from lorakd.export import _fp32_nodes

    names = ["/m/bert/encoder/layer.0/attention/self/query/MatMul", "/m/bert/encoder/layer.0/intermediate/fp32/MatMul",
             "/m/bert/encoder/layer.1/query/MatMul", "/m/bert/encoder/layer.1/key/MatMul",
             "/m/bert/encoder/layer.1/output/dense/int8/MatMul", "/m/bert/pooler/dense/Gemm"]
    keep = _fp32_nodes(names, first_token=True)
    assert [n for n in names if n in keep] == [names[1], names[2], names[4], names[5]]
    assert "/m/bert/pooler/dense/Gemm_MatMul" in keep
    assert [n for n in names if n in _fp32_nodes(names, first_token=False)] == [names[1], names[5]]


def test_key_and_value_biases_fold_away_with_the_same_logits(tiny_backbone):
    """Key bias dropped (softmax ignores a shift shared by a query's scores), value bias moved into the output
    projection's bias (softmax rows sum to 1): the same logits on a padded batch, first-token layer included."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorakd.export import _first_token_only, _fold_attention_biases

    model = AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=4).eval()
    model.set_attn_implementation("eager")
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    for layer in model.bert.encoder.layer:  # random init leaves biases at zero: make them matter
        for lin in (layer.attention.self.key, layer.attention.self.value):
            lin.bias.data.normal_(0, 1.0)
    enc = tok(["election war peace", "goal match season coach league final", "chip"], padding=True,
              return_tensors="pt")
    with torch.inference_mode():
        before = model(**enc).logits
        _first_token_only(model)
        assert _fold_attention_biases(model) == 2
        assert torch.allclose(model(**enc).logits, before, atol=1e-5)
    assert model.bert.encoder.layer[0].attention.self.key.bias is None


def test_int8_products_scale_each_row_alone(tmp_path):
    """_quantize_rows: one MatMul + bias becomes int8 with a scale per row, computed as numpy computes it; a row
    gives the same output whatever rows share its batch (dynamic quantisation's one scale per batch would not).
    A row of 100x range is in the batch: with full-range int8 weights, CPUs without VNNI saturated its sums."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from lorakd.export import W_LEVELS, _quantize_rows
    from lorakd.predict import onnx_session

    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=8).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["t"], name="mm"), helper.make_node("Add", ["t", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "f.onnx")
    assert _quantize_rows(tmp_path / "f.onnx", tmp_path / "q.onnx", keep=[]) == 1
    run = onnx_session(tmp_path / "q.onnx").run
    x = rng.normal(size=(2, 3, 16)).astype(np.float32)
    x[1] *= 100  # a text of far larger range beside the first
    got = run(["y"], {"x": x})[0]
    w_scale = np.abs(w).max(0) / W_LEVELS
    row_scale = np.abs(x).max(-1, keepdims=True) / 127
    want = (np.round(x / row_scale) @ np.round(w / w_scale)) * row_scale * w_scale + b
    assert np.allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.allclose(run(["y"], {"x": x[:1]})[0], got[:1], rtol=1e-6, atol=1e-6)
    assert np.abs(got - (x @ w + b)).max() < 0.05 * np.abs(x @ w).max()


def test_smoothing_moves_outsized_input_channels_into_the_weights_with_the_same_logits(tiny_backbone, tmp_path):
    """_smooth: the products fed by a LayerNorm (query/key/value, up-projection) read their input divided per
    channel, and the attention output projection's factors go into the value columns; fp32 logits are unchanged
    (it checks them itself) and an outsized input channel comes out no larger than the others."""
    import onnx
    import onnxruntime as ort
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorakd.export import (_calibration_batches, _first_token_only, _fp32_nodes, _int8_source, _smooth,
                               _to_onnx)

    model = AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=4).eval()
    model.set_attn_implementation("eager")
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    model.bert.embeddings.LayerNorm.weight.data[5] = 40.0  # an outsized channel into layer 0's query/key/value
    first = _first_token_only(model)
    split, _ = _int8_source(model, tok)
    _to_onnx(split, tok, tmp_path / "split.onnx")
    keep = _fp32_nodes([n.name for n in onnx.load(tmp_path / "split.onnx").graph.node], first)
    batches = _calibration_batches(tok, ["election war peace", "goal match season coach league final", "chip"], 32)
    assert _smooth(tmp_path / "split.onnx", tmp_path / "smooth.onnx", keep, batches) >= 7
    m = onnx.load(tmp_path / "smooth.onnx")
    mul = next(n for n in m.graph.node if n.op_type == "Mul" and n.name.endswith("/smooth")
               and "embeddings/LayerNorm" in n.input[0])
    probe = onnx.load(tmp_path / "smooth.onnx")
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None) for v in
                              (mul.input[0], mul.output[0]))
    ratio = [float(p[5] / np.median(p)) for p in (np.abs(v).reshape(-1, v.shape[-1]).max(0) for v in ort.InferenceSession(
        probe.SerializeToString(), providers=["CPUExecutionProvider"]).run([mul.input[0], mul.output[0]], batches[0]))]
    assert ratio[0] > 30 and ratio[1] < ratio[0] / 4  # about the square root with alpha 0.5


def test_only_bert_layer_names_are_smoothed_other_encoders_keep_per_row_scales():
    """_smoothable: BERT's names (the first-token last layer's too) take the smoothed per-batch graph; MPNet's
    q/k/v and DistilBERT's layers, which _smooth would not find, keep per-row scales."""
    from lorakd.export import _smoothable

    bert = [f"/m/bert/encoder/layer.{i}/attention/self/{p}/MatMul" for i in (0, 1) for p in ("query", "key", "value")]
    assert _smoothable(bert + ["/m/bert/encoder/layer.2/query/MatMul", "/m/bert/encoder/layer.2/output/dense/MatMul"])
    assert not _smoothable(bert + ["/m/bert/encoder/layer.2/output/dense/MatMul"])  # a layer without them
    assert not _smoothable([f"/m/mpnet/encoder/layer.{i}/attention/attn/{p}/MatMul" for i in (0, 1) for p in "qkv"])
    assert not _smoothable(["/m/distilbert/transformer/layer.0/attention/q_lin/MatMul"])


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
