"""ONNX export: model.onnx (fp32, checked against PyTorch) and model.int8.onnx (onnx_int8) for onnxruntime, the
last layer computed for the first token only."""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np

from .errors import UserError
from .onnx_int8 import (SAMPLE, calibration_batches, fp32_nodes, int8_source, quantize_dynamic, quantize_rows,
                        smooth, smoothable)
from .predict import onnx_session


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


def export_onnx(model, tok, folder: Path, max_length: int, log=print, calibration_texts=list) -> dict:
    """model.onnx (fp32) and model.int8.onnx: matrix-product weights int8 per output channel, activations
    quantised at run time with one scale per batch (onnxruntime's quantize_dynamic) after smoothing (smooth, on
    calibration_texts(): up to 256 of the run's training texts, read only for a graph it smooths; SAMPLE when
    it gives none). Agreement with PyTorch
    99.70-99.73% at batches of 4, 8 and 16 against 99.45-99.52% unsmoothed, and about 1.1x the speed of the
    per-row graph (interleaved A/B on the MiniLM student, 2026-12-01). Layer names smooth does not know
    (MPNet, DistilBERT, ...) get per-row scales instead (quantize_rows: 99.64% there, batch-independent).
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
    split, channels = int8_source(fast, tok)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        _to_onnx(split, tok, Path(tmp) / "split.onnx")
        names = [n.name for n in onnx.load(Path(tmp) / "split.onnx").graph.node]
        keep = fp32_nodes(names, first)
        scales = "per batch, smoothed" if smoothable(names) else "per row"
        if scales != "per row":
            smooth(Path(tmp) / "split.onnx", Path(tmp) / "smooth.onnx", keep,
                    calibration_batches(tok, list(calibration_texts() or SAMPLE)[:256], max_length))
            quantize_dynamic(Path(tmp) / "smooth.onnx", int8, keep)
        else:
            quantize_rows(Path(tmp) / "split.onnx", int8, keep)
    log(f"ONNX: {fp32.name} (max |logit difference| to PyTorch {diff:.1e}), {int8.name} (int8, activation scales "
        f"{scales}; {channels} outsized feed-forward channels kept in fp32)")
    return {"onnx_max_abs_diff": diff, "int8_fp32_channels": channels, "last_layer_first_token_only": first,
            "int8_activation_scales": scales}


def calibration_texts_from(cfg, log=print, n=256) -> list[str]:
    """Up to n stratified texts of the run's training split (never validation or test) for smooth's ranges; none
    (SAMPLE is used) when the data cannot be read here."""
    from . import data as data_lib

    try:
        train = data_lib.load_splits(cfg.data, cfg.train.seed)["train"]
    except (UserError, OSError) as e:
        log(f"ONNX int8: the training data cannot be read ({e}); smoothing calibrated on {len(SAMPLE)} sample texts")
        return []
    return [train.texts[i] for i in data_lib.stratified_take(train.labels, min(n, len(train.texts)), 0)]
