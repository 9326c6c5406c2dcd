"""Static (calibrated) against dynamic int8 for `lorakd predict`'s ONNX path (issue 16's lever table).
    python bench/static_quant.py --run /tmp/minilm-student [--variants dynamic qdq-minmax ...]
Builds the graph `lorakd export --onnx` quantises (first-token last layer, onnx_int8.int8_source), then
quantises it each way asked: dynamic as the export does, or static with activation ranges calibrated on
--calib texts of the run's TRAIN split (never its validation rows), with the export's fp32 exceptions. Each
model predicts every text of --data through lorakd's own batching (batches of 8, one per core); texts/s is
the best of --repeat model-only runs (tokenising included), with the load average before it;
cpu_texts_per_s: texts per CPU-second x 2, fairer when the machine is shared. Agreement is
with the PyTorch student's labels (computed once, cached in --work). Prints one JSON line per variant.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lorakd import data as data_lib  # noqa: E402
from lorakd import readers  # noqa: E402
from lorakd import onnx_export, onnx_int8  # noqa: E402
from lorakd.inference import open_run  # noqa: E402
from lorakd.predict import CHUNK, OnnxModel, logits_of, onnx_session, open_model  # noqa: E402
from lorakd.runs import load_run  # noqa: E402


def static_variants():
    from onnxruntime.quantization import CalibrationMethod as C
    from onnxruntime.quantization import QuantFormat as F
    from onnxruntime.quantization import QuantType as T
    # noout: MatMul outputs stay fp32 (DQ -> MatMul -> fp32, which onnxruntime runs as MatMulIntegerToFloat)
    base = dict(quant_format=F.QDQ, calibrate_method=C.MinMax, activation_type=T.QUInt8, sym=False, reduce=False,
                noout=False)
    v = {"qdq-minmax": {}, "qdq-minmax-noout": dict(noout=True),
         "qdq-percentile-noout": dict(noout=True, calibrate_method=C.Percentile),
         "qdq-entropy-noout": dict(noout=True, calibrate_method=C.Entropy),
         "qdq-minmax-noout-sym": dict(noout=True, sym=True),
         "qdq-minmax-noout-reduce": dict(noout=True, reduce=True),
         "qop-minmax": dict(quant_format=F.QOperator),
         "qop-percentile": dict(quant_format=F.QOperator, calibrate_method=C.Percentile),
         "qop-entropy": dict(quant_format=F.QOperator, calibrate_method=C.Entropy),
         "qop-minmax-sym": dict(quant_format=F.QOperator, sym=True),
         "qop-minmax-reduce": dict(quant_format=F.QOperator, reduce=True)}
    return {k: {**base, **o} for k, o in v.items()}


class Reader:
    """Calibration batches of 8 texts of similar length, padded as `lorakd predict` pads them (fixed: all to the
    longest text; onnxruntime's histogram calibrators need one shape)."""

    def __init__(self, tok, texts, max_length, batch=8, fixed=False):
        enc = sorted(data_lib.encode(tok, texts, max_length), key=len)
        self.batches = []
        for i in range(0, len(enc), batch):
            part = enc[i:i + batch]
            ids = np.full((len(part), len(enc[-1] if fixed else part[-1])), data_lib.pad_id(tok), dtype=np.int64)
            mask = np.zeros_like(ids)
            for r, e in enumerate(part):
                ids[r, :len(e)], mask[r, :len(e)] = e, 1
            self.batches.append({"input_ids": ids, "attention_mask": mask})
        self.it = iter(self.batches)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.batches)


def build(run, work: Path, calib_n: int, variants):
    """split.onnx (the graph the export quantises) and one int8 file per variant; returns export seconds."""
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static

    trained = open_run(run, torch.device("cpu"), precision="fp32")  # merged, as the export quantises it
    cfg, model, tok = trained.cfg, trained.model, trained.tok
    model.set_attn_implementation("eager")
    split_path = work / "split.onnx"
    first = onnx_export._first_token_only(model)  # the model is this function's own: rewritten in place
    fast, _ = onnx_int8.int8_source(model, tok)
    if not split_path.exists():
        onnx_export._to_onnx(fast, tok, split_path)
    keep = onnx_int8.fp32_nodes([n.name for n in onnx.load(split_path).graph.node], first)
    train = data_lib.load_splits(cfg.data, cfg.train.seed)["train"]  # the rows it trained on; never validation
    calib = [train.texts[i] for i in data_lib.stratified_take(train.labels, calib_n, 0)]
    seconds = {}
    for name in variants:
        out = work / f"{name}.onnx"
        if out.exists():
            continue
        t0 = time.perf_counter()
        if name == "dynamic":
            quantize_dynamic(split_path, out, weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul"], nodes_to_exclude=keep)
        else:
            from onnxruntime.quantization import CalibrationMethod as C
            v = static_variants()[name]
            reader = Reader(tok, calib, cfg.data.max_length, fixed=v["calibrate_method"] != C.MinMax)
            quantize_static(split_path, out, reader, quant_format=v["quant_format"], op_types_to_quantize=["MatMul"],
                            per_channel=True, reduce_range=v["reduce"], activation_type=v["activation_type"],
                            weight_type=QuantType.QInt8, nodes_to_exclude=keep, calibrate_method=v["calibrate_method"],
                            extra_options={"ActivationSymmetric": v["sym"], "MatMulConstBOnly": True,
                                           "OpTypesToExcludeOutputQuantization": ["MatMul"] if v["noout"] else []})
        seconds[name] = round(time.perf_counter() - t0, 1)
    tok.model_max_length = cfg.data.max_length
    return seconds, tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ag_news" / "train.csv"))
    ap.add_argument("--work", default="/tmp/lorakd-static-quant")
    ap.add_argument("--calib", type=int, default=256, help="training texts to calibrate on")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--variants", nargs="+", help="default: the lever table's order, dynamic again before Entropy",
                    default=["dynamic", "qdq-minmax-noout", "qop-minmax", "qop-percentile", "qdq-percentile-noout",
                             "qdq-minmax-noout-sym", "qop-minmax-sym", "qop-minmax-reduce", "qdq-minmax-noout-reduce",
                             "dynamic", "qop-entropy", "qdq-entropy-noout"])
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg, _ = load_run(args.run)
    split = readers.read_file(args.data, cfg.data.label_names)
    ref_path = work / "pytorch_labels.npy"
    if not ref_path.exists():
        m = open_model("run", Path(args.run), "cpu")
        np.save(ref_path, logits_of(m, split.texts, 256).argmax(-1))
    ref = np.load(ref_path)
    quant_s, tok = build(args.run, work, args.calib, args.variants)
    for name in args.variants:
        sess = onnx_session(work / f"{name}.onnx", 1)
        m = OnnxModel(tok, cfg.data.max_length, lambda ids, mask, s=sess: s.run(["logits"], {
            "input_ids": ids, "attention_mask": mask})[0], workers=2, device="cpu")
        logits_of(m, split.texts[:256], 8)  # warm-up
        tries = []
        for _ in range(args.repeat):
            load, t0, c0 = os.getloadavg()[0], time.perf_counter(), time.process_time()
            pred = np.concatenate([logits_of(m, split.texts[i:i + CHUNK], 8).argmax(-1)  # as predict chunks
                                   for i in range(0, len(split), CHUNK)])
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            tries.append((len(split) / wall, load, len(split) / cpu * 2))
        best, load, _ = max(tries)
        print(json.dumps({"variant": name, "texts_per_s": round(best, 1),
                          "all_texts_per_s": [round(t[0], 1) for t in tries], "load": round(load, 2),
                          "cpu_texts_per_s": round(max(t[2] for t in tries), 1),
                          "agreement": round(float((pred == ref).mean()), 5),
                          "accuracy": round(float((pred == split.labels).mean()), 5),
                          "mb": round((work / f"{name}.onnx").stat().st_size / 1e6, 1),
                          "quantise_s": quant_s.get(name)}), flush=True)


if __name__ == "__main__":
    main()
