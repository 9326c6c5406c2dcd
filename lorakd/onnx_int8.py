"""ONNX int8: the fp32 graph rewritten for int8 with the same function (attention biases folded, outsized
feed-forward channels routed around int8), then quantised: smoothed with one activation scale per batch
(onnxruntime's dynamic quantisation) where the layer names are BERT's, else one scale per row."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .errors import UserError

# texts to trace, check and probe the graphs on: short and long, so that padding is exercised
SAMPLE = ["President signs the treaty after talks", "The home team won the final in extra time on Sunday",
          "Shares fell", "A new chip doubles battery life of laptops, the company said in a statement today"]


def fold_attention_biases(model) -> int:
    """Drop the key and value biases from the attention products, exactly: the key bias adds q.b_k to all of a
    query's scores alike, which softmax ignores; softmax rows sum to 1, so the value bias reaches the context
    unchanged and the output projection can take it as W_o b_v in its own bias. Two bias additions fewer per layer
    in the int8 graph, whose per-row scaled products cannot fold them in. BERT-family layers
    (attention.self.key/value, attention.output.dense); returns how many layers were changed."""
    import torch

    count = 0
    for layer in model.modules():
        att = getattr(layer, "attention", None)
        s, out = getattr(att, "self", None), getattr(getattr(att, "output", None), "dense", None)
        if not all(isinstance(getattr(s, n, None), torch.nn.Linear) for n in ("key", "value")) or out is None:
            continue
        if s.key.bias is None or s.value.bias is None:
            continue
        with torch.no_grad():
            out.bias += out.weight @ s.value.bias
        s.key.bias, s.value.bias = None, None
        count += 1
    return count


def split_outliers(model, tok, ratio=10.0, most=16, align=16) -> int:
    """Route the few feed-forward channels of outsized range around int8. A run-time activation scale (one per
    token, quantize_rows) is set by the token's largest value: one channel of 25 among channels of 1 (BERT's
    feed-forward outputs have such channels) leaves the others a handful of levels. Each layer's up-projection is split in two: the
    ordinary channels (int8, on to the int8 down-projection) and the outsized ones (a small fp32 product through
    the activation and back down, added to the int8 result). Same function; no pass over the whole activation
    tensor to take them out. Layers with `intermediate.dense` and `output.dense` (BERT, RoBERTa, DeBERTa, MPNet
    and kin); returns how many channels were split out.
    A layer that splits any channel splits enough (the next largest) to leave a multiple of `align` in int8:
    onnxruntime's int8 product is about a quarter slower on a row of 1,510 outputs than of 1,504 or 1,520
    (misaligned rows; measured on [400, 384] x [384, N]), and the up-projection is its largest."""
    import torch

    def linear(w, b):
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        lin.weight.data = w.clone()
        if b is not None:
            lin.bias.data = b.clone()
        return lin

    class Up(torch.nn.Module):  # replaces `intermediate`: (ordinary channels, outsized channels), activated
        def __init__(self, inter, keep, channels):
            super().__init__()
            w, b = inter.dense.weight.data, inter.dense.bias.data
            self.int8, self.fp32 = linear(w[keep], b[keep]), linear(w[channels], b[channels])
            self.act = inter.intermediate_act_fn

        def forward(self, x):
            return self.act(self.int8(x)), self.act(self.fp32(x))

    class Down(torch.nn.Module):  # replaces `output.dense`: both parts back to the hidden size
        def __init__(self, dense, keep, channels):
            super().__init__()
            self.int8 = linear(dense.weight.data[:, keep], dense.bias.data)
            self.fp32 = linear(dense.weight.data[:, channels], None)

        def forward(self, parts):
            return self.int8(parts[0]) + self.fp32(parts[1])

    layers = [m for m in model.modules() if isinstance(getattr(m, "intermediate", None), torch.nn.Module)
              and isinstance(getattr(m.intermediate, "dense", None), torch.nn.Linear)
              and isinstance(getattr(getattr(m, "output", None), "dense", None), torch.nn.Linear)]
    peaks = _feed_forward_peaks(model, tok, layers)
    count = 0
    for layer in layers:
        peak = peaks[layer]
        channels = torch.nonzero(peak > ratio * peak.median()).flatten()
        channels = channels[peak[channels].argsort(descending=True)][:most]
        if len(channels) and align:  # round up to the next largest peaks: int8 keeps a multiple of align
            channels = peak.argsort(descending=True)[:len(channels) + (len(peak) - len(channels)) % align]
        if len(channels):
            keep = torch.ones(len(peak), dtype=torch.bool)
            keep[channels] = False
            layer.output.dense = Down(layer.output.dense, keep, channels)
            layer.intermediate = Up(layer.intermediate, keep, channels)
            count += len(channels)
    return count


def _feed_forward_peaks(model, tok, layers) -> dict:
    """layer -> each feed-forward channel's largest |activation| on the SAMPLE texts (outsized channels show on
    any text)."""
    import torch

    peaks = {}

    def record(layer):
        return lambda mod, inp, out: peaks.__setitem__(layer, out.abs().flatten(0, -2).amax(0))
    hooks = [m.intermediate.register_forward_hook(record(m)) for m in layers]
    with torch.inference_mode():
        model(**tok(SAMPLE, padding=True, return_tensors="pt"))
    for h in hooks:
        h.remove()
    return peaks


def int8_source(model, tok):
    """A copy of the (first-token) model rewritten for int8, same function: attention biases folded, outsized
    feed-forward channels split off. Returns (copy, channels split off)."""
    import copy

    split = copy.deepcopy(model)
    fold_attention_biases(split)
    return split, split_outliers(split, tok)


def fp32_nodes(names, first_token: bool) -> list[str]:
    """Products kept out of int8: the outsized channels' ("/fp32/"), the head's (pooler, classifier), and with
    the first-token last layer all of that layer's but keys and values. Those run on one row per text, so
    int8 saves nothing there, and a per-tensor scale over a handful of rows is what costs agreement."""
    layers = [int(m.group(1)) for n in names if (m := re.search(r"/encoder/layer\.(\d+)/", n))]
    last = f"/encoder/layer.{max(layers)}/" if layers and first_token else None
    keep = [n for n in names if "/fp32/" in n or "/encoder/" not in n
            or (last and last in n and not re.search(r"/(key|value)/", n))]
    # + onnxruntime's quantisers' name for a Gemm they turn into MatMul + Add (bench/static_quant.py uses them)
    return keep + [n + "_MatMul" for n in keep]


W_LEVELS = 63  # int8 weights use [-63, 63]: see quantize_rows


def quantize_rows(src: Path, dst: Path, keep) -> int:
    """The int8 graph: every MatMul with a constant weight (but `keep`) becomes an int8 product. Weights: int8 per
    output channel. Activations: uint8 (zero point 128) at run time with one scale per row, i.e. per token, where
    onnxruntime's dynamic quantisation takes one scale for the whole batch: a row is then quantised the same
    whichever texts share its batch, and a token of small range keeps its levels (agreement with PyTorch 99.4-99.6%
    moving with batching before, 99.7% fixed after; bench/predict_cpu.py). One quantisation serves all products
    of a tensor (query, key, value). onnxruntime's MatMulIntegerToFloat takes the row scales as its A scale
    ([..., rows, 1]); the bias is added after it (given there, it would be scaled by the row scale). Opset 17.
    Returns the number of int8 products."""
    import onnx
    from onnx import helper as h
    from onnx import numpy_helper

    m = onnx.load(src)
    g, keep = m.graph, set(keep)
    weights = {i.name: i for i in g.initializer}
    added = []

    def const(name, value):
        added.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    zp, tiny = const("rows/zp", np.uint8(128)), const("rows/tiny", np.float32(1e-30))
    inv127 = const("rows/1/127", np.float32(1 / 127))
    zero, z128 = const("rows/0.0", np.float32(0)), const("rows/128.0", np.float32(128))
    flat = const("rows/flat", np.array([-1]))
    nodes, quantised, count = [], {}, 0
    for n in g.node:  # topological order kept: each MatMul is replaced in place (its bias Add stays after it)
        if n.op_type != "MatMul" or n.name in keep or n.input[1] not in weights:
            nodes.append(n)
            continue
        x, p = n.input[0], n.name
        w = numpy_helper.to_array(weights[n.input[1]]).astype(np.float32)
        # 7-bit weights (ORT's reduce_range): on x86 without VNNI, u8 x s8 products are summed in pairs into int16
        # (vpmaddubsw), which saturates past 255 * 64 * 2; full-range weights gave wrong sums on an AVX2-only CPU
        w_scale = np.maximum(np.abs(w).max(0), 1e-12) / W_LEVELS
        w_int8 = const(p + "/w", np.round(w / w_scale).astype(np.int8))
        w_scale = const(p + "/w_scale", w_scale.astype(np.float32))
        if x not in quantised:
            nodes += _quantise_per_row(x, p, w.shape[0], (tiny, inv127, zero, z128, flat), const)
            quantised[x] = p + "/q", p + "/row_scale"
        q, row_scale = quantised[x]
        nodes.append(h.make_node("MatMulIntegerToFloat", [q, w_int8, row_scale, w_scale, zp], [n.output[0]],
                                 name=p + "/int8", domain="com.microsoft"))
        count += 1
    del g.node[:]
    g.node.extend(nodes)
    live = [i for i in g.initializer if i.name in {i for n in g.node for i in n.input}]
    del g.initializer[:]
    g.initializer.extend(live + added)
    if not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(h.make_opsetid("com.microsoft", 1))
    onnx.save(m, dst)
    return count


def _quantise_per_row(x, p, width, shared, const) -> list:
    """Nodes quantising x ([..., rows, width]) to uint8 (zero point 128) with one symmetric scale per row: p/q and
    p/row_scale ([..., rows, 1]). shared: the constants' names (tiny, 1/127, 0, 128, [-1])."""
    from onnx import TensorProto
    from onnx import helper as h

    tiny, inv127, zero, z128, flat = shared
    v = lambda s: f"{p}/{s}"  # noqa: E731
    return [
        h.make_node("ReduceMax", [x], [v("hi")], axes=[-1], keepdims=1),  # [..., rows, 1]
        h.make_node("ReduceMin", [x], [v("lo")], axes=[-1], keepdims=1),
        h.make_node("Neg", [v("lo")], [v("-lo")]),
        h.make_node("Max", [v("hi"), v("-lo"), tiny], [v("absmax")]),  # symmetric; an all-zero row stays finite
        h.make_node("Mul", [v("absmax"), inv127], [v("row_scale")]),
        # QuantizeLinear takes per-row scales along axis 0 of a 2-D view, zero points of the scales' shape
        h.make_node("Reshape", [v("row_scale"), flat], [v("scale")]),
        h.make_node("Mul", [v("scale"), zero], [v("0")]),
        h.make_node("Add", [v("0"), z128], [v("128")]),
        h.make_node("Cast", [v("128")], [v("zp")], to=TensorProto.UINT8),
        h.make_node("Reshape", [x, const(v("2d"), np.array([-1, width]))], [v("x2")]),
        h.make_node("QuantizeLinear", [v("x2"), v("scale"), v("zp")], [v("q2")], axis=0),
        h.make_node("Shape", [x], [v("shape")]),
        h.make_node("Reshape", [v("q2"), v("shape")], [v("q")])]


def calibration_batches(tok, texts, max_length, batch=8) -> list[dict]:
    """Texts sorted by length in batches of `batch`, each padded to its longest, as `lorakd predict` batches them."""
    from . import data as data_lib

    enc = sorted(data_lib.encode(tok, texts, max_length), key=len)
    return [dict(zip(("input_ids", "attention_mask"), data_lib.pad_rows(enc[i:i + batch], tok.pad_token_id or 0)))
            for i in range(0, len(enc), batch)]


def smoothable(names) -> bool:
    """Whether smooth knows these layer names: BERT's (BERT, RoBERTa, XLM-R, ELECTRA), query/key/value in every
    encoder layer. Other encoders (MPNet, DistilBERT, ...) keep per-row scales, which need no names."""
    layers = {m.group(1) for n in names if (m := re.search(r"/encoder/layer\.(\d+)/", n))}
    return bool(layers) and all(any(re.search(rf"/layer\.{i}/(.*/)?(query|key|value)/MatMul$", n) for n in names)
                                for i in layers)


def smooth(src: Path, dst: Path, keep, batches, alpha=0.5, atol=1e-3) -> int:
    """SmoothQuant-style smoothing of the graph before one-scale-per-batch dynamic int8, same function. A product
    X W is computed as (X / s) (s W) with s_j = max|X_j|^alpha / max|W_j|^(1-alpha) per input channel (max |X_j|
    over the calibration `batches`): the few channels of outsized range in X, which set the batch's one scale and
    leave the others a handful of levels, are moved into the int8-per-channel weights. Query/key/value (one
    shared Mul) and the feed-forward up-projection (its int8 part) get a Mul by 1/s on their input (in a post-LN
    layer that input is also the residual, so the LayerNorm cannot take 1/s); the attention output projection's
    1/s goes into the value product's output columns (attention is linear in V per head and softmax rows sum
    to 1), no extra node. The feed-forward down-projection's input (after GELU) keeps its outsized channels split
    off (split_outliers). Checked: the smoothed graph's logits on the batches within `atol` of src's.
    Returns the number of products smoothed."""
    import onnx
    import onnxruntime as ort
    from onnx import helper as h
    from onnx import numpy_helper

    m = onnx.load(src)
    g, keep = m.graph, set(keep)
    weights = {i.name: i for i in g.initializer}
    mm = {n.name: n for n in g.node if n.op_type == "MatMul" and n.name not in keep and n.input[1] in weights}
    groups = {}  # input -> products smoothed by one Mul on it
    for n in mm.values():
        if re.search(r"/(query|key|value|intermediate/int8|intermediate/dense)/MatMul$", n.name):
            groups.setdefault(n.input[0], []).append(n.name)
    outs = [n for n in mm.values() if re.search(r"/attention/output/dense/MatMul$", n.name)
            and n.name.replace("/attention/output/dense/", "/attention/self/value/") in mm]
    peak, want = _input_peaks(m, sorted(set(groups) | {n.input[0] for n in outs}), batches)
    w = {n.input[1]: numpy_helper.to_array(weights[n.input[1]]).astype(np.float32) for n in mm.values()}

    def factors(x, products):
        wmax = np.max([np.abs(w[mm[p].input[1]]).max(1) for p in products], 0)
        s = np.maximum(peak[x], 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)
        return np.clip(s, 1e-2, 1e2).astype(np.float32)

    muls, count = {}, 0
    for x, products in groups.items():
        s = factors(x, products)
        for p in products:
            w[mm[p].input[1]] *= s[:, None]
            mm[p].input[0] = x + "/smooth"
        m.graph.initializer.append(numpy_helper.from_array(1 / s, x + "/smooth/inv"))
        muls[x] = h.make_node("Mul", [x, x + "/smooth/inv"], [x + "/smooth"], name=x + "/smooth")
        count += len(products)
    for n in outs:
        value = mm[n.name.replace("/attention/output/dense/", "/attention/self/value/")]
        s = factors(n.input[0], [n.name])
        w[n.input[1]] *= s[:, None]
        w[value.input[1]] /= s[None, :]
        _divide_bias(g, weights, value.output[0], s)  # a value bias, where one is left: scaled with its columns
        count += 1
    for k, v in w.items():
        weights[k].CopyFrom(numpy_helper.from_array(v, k))
    _insert_before_readers(g, muls)
    onnx.save(m, dst)
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    if (diff := max(float(np.abs(sess.run(["logits"], b)[0] - v).max()) for b, v in zip(batches, want))) > atol:
        raise UserError(f"smoothing changed the logits by {diff:.2e} (over {atol}); not exported")
    return count


def _input_peaks(m, names, batches):
    """({input: per-channel max |value| over the calibration batches}, the logits of each batch): the graph m run
    with those inputs as extra outputs (fp32, unoptimised)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper as h

    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    probe.graph.output.extend(h.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None) for x in names)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    peak, want = {}, []
    for b in batches:
        got = sess.run(["logits"] + names, b)
        want.append(got[0])
        for x, v in zip(names, got[1:]):
            peak[x] = np.maximum(peak.get(x, 0), np.abs(v.reshape(-1, v.shape[-1])).max(0))
    return peak, want


def _divide_bias(g, weights, output, s):
    """The constant bias added to `output` (an Add reading it), divided by s per column."""
    from onnx import numpy_helper

    for c in g.node:
        if c.op_type == "Add" and output in c.input:
            b = next((i for i in c.input if i in weights), None)
            if b is not None:
                weights[b].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights[b]) / s, b))


def _insert_before_readers(g, muls):
    """Each {input: Mul} node right before the first node reading its output (topological order kept)."""
    nodes = []
    for n in g.node:
        x = next((x for x, mul in muls.items() if mul.output[0] in n.input), None)
        nodes += [muls.pop(x), n] if x is not None else [n]
    del g.node[:]
    g.node.extend(nodes)


def quantize_dynamic(src: Path, dst: Path, keep):
    """onnxruntime's dynamic quantisation: int8 weights per output channel, MatMul only, `keep` left fp32; the
    session fuses each product, its batch's activation scale and its bias (DynamicQuantizeMatMul)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root, null = logging.getLogger(), logging.NullHandler()
    level = root.level
    root.addHandler(null)  # its advice to pre-process goes to the root logger; that step fails on BERT
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                         nodes_to_exclude=keep)
    finally:
        root.removeHandler(null)
        root.setLevel(level)
