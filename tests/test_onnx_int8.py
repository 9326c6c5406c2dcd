"""ONNX int8: the graph rewrites keep the model's function (outsized channels, folded biases), the products kept
in fp32, the per-row int8 products, smoothing and where it applies."""
import numpy as np
import torch


def test_outlier_channels_leave_int8_with_the_same_function(tiny_backbone):
    """A feed-forward channel 50x the others (as BERT's have) is routed around int8; fp32 logits are unchanged."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorakd.onnx_int8 import split_outliers

    model = AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=4).eval()
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    inter = model.bert.encoder.layer[0].intermediate.dense
    inter.weight.data[3] *= 50
    inter.bias.data[3] = 30.0
    enc = tok(["election war peace", "goal match season coach league"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        before = model(**enc).logits
        assert split_outliers(model, tok) >= 1
        assert torch.allclose(model(**enc).logits, before, atol=1e-5)
    assert type(model.bert.encoder.layer[0].intermediate).__name__ == "Up"
    assert type(model.bert.encoder.layer[0].output.dense).__name__ == "Down"
    # 64 channels, 1 outsized: the next largest go with it so that int8 keeps a multiple of 16 (aligned rows)
    assert model.bert.encoder.layer[0].intermediate.int8.out_features == 48
    assert torch.equal(model.bert.encoder.layer[0].intermediate.fp32.weight[0], inter.weight[3])  # largest first


def test_products_on_one_row_per_text_stay_fp32():
    """With the first-token last layer, its products (but keys and values) and the head's are not quantised."""
    from lorakd.onnx_int8 import fp32_nodes

    names = ["/m/bert/encoder/layer.0/attention/self/query/MatMul", "/m/bert/encoder/layer.0/intermediate/fp32/MatMul",
             "/m/bert/encoder/layer.1/query/MatMul", "/m/bert/encoder/layer.1/key/MatMul",
             "/m/bert/encoder/layer.1/output/dense/int8/MatMul", "/m/bert/pooler/dense/Gemm"]
    keep = fp32_nodes(names, first_token=True)
    assert [n for n in names if n in keep] == [names[1], names[2], names[4], names[5]]
    assert "/m/bert/pooler/dense/Gemm_MatMul" in keep
    assert [n for n in names if n in fp32_nodes(names, first_token=False)] == [names[1], names[5]]


def test_key_and_value_biases_fold_away_with_the_same_logits(tiny_backbone):
    """Key bias dropped (softmax ignores a shift shared by a query's scores), value bias moved into the output
    projection's bias (softmax rows sum to 1): the same logits on a padded batch, first-token layer included."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorakd.onnx_export import _first_token_only
    from lorakd.onnx_int8 import fold_attention_biases

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
        assert fold_attention_biases(model) == 2
        assert torch.allclose(model(**enc).logits, before, atol=1e-5)
    assert model.bert.encoder.layer[0].attention.self.key.bias is None


def test_int8_products_scale_each_row_alone(tmp_path):
    """quantize_rows: one MatMul + bias becomes int8 with a scale per row, computed as numpy computes it; a row
    gives the same output whatever rows share its batch (dynamic quantisation's one scale per batch would not).
    A row of 100x range is in the batch: with full-range int8 weights, CPUs without VNNI saturated its sums."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from lorakd.onnx_int8 import W_LEVELS, quantize_rows
    from lorakd.predict import onnx_session

    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=8).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["t"], name="mm"), helper.make_node("Add", ["t", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "f.onnx")
    assert quantize_rows(tmp_path / "f.onnx", tmp_path / "q.onnx", keep=[]) == 1
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
    """smooth: the products fed by a LayerNorm (query/key/value, up-projection) read their input divided per
    channel, and the attention output projection's factors go into the value columns; fp32 logits are unchanged
    (it checks them itself) and an outsized input channel comes out no larger than the others."""
    import onnx
    import onnxruntime as ort
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorakd.onnx_export import _first_token_only, _to_onnx
    from lorakd.onnx_int8 import calibration_batches, fp32_nodes, int8_source, smooth

    model = AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=4).eval()
    model.set_attn_implementation("eager")
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    model.bert.embeddings.LayerNorm.weight.data[5] = 40.0  # an outsized channel into layer 0's query/key/value
    first = _first_token_only(model)
    split, _ = int8_source(model, tok)
    _to_onnx(split, tok, tmp_path / "split.onnx")
    keep = fp32_nodes([n.name for n in onnx.load(tmp_path / "split.onnx").graph.node], first)
    batches = calibration_batches(tok, ["election war peace", "goal match season coach league final", "chip"], 32)
    assert smooth(tmp_path / "split.onnx", tmp_path / "smooth.onnx", keep, batches) >= 7
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
    """smoothable: BERT's names (the first-token last layer's too) take the smoothed per-batch graph; MPNet's
    q/k/v and DistilBERT's layers, which smooth would not find, keep per-row scales."""
    from lorakd.onnx_int8 import smoothable

    bert = [f"/m/bert/encoder/layer.{i}/attention/self/{p}/MatMul" for i in (0, 1) for p in ("query", "key", "value")]
    assert smoothable(bert + ["/m/bert/encoder/layer.2/query/MatMul", "/m/bert/encoder/layer.2/output/dense/MatMul"])
    assert not smoothable(bert + ["/m/bert/encoder/layer.2/output/dense/MatMul"])  # a layer without them
    assert not smoothable([f"/m/mpnet/encoder/layer.{i}/attention/attn/{p}/MatMul" for i in (0, 1) for p in "qkv"])
    assert not smoothable(["/m/distilbert/transformer/layer.0/attention/q_lin/MatMul"])
