"""Predict: labels for unlabelled texts (CSV, JSONL, pickle) from a run folder, an exported Hugging Face or
adapter folder, or an ONNX file; streamed in chunks and written as ID,Label (and with --scores each class's
probability) atomically."""
from __future__ import annotations

import csv
import io
import os
import queue
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import atomic
from . import data as data_lib
from . import readers
from .rows import row_text
from .errors import UserError
from .errors import first_line
from .trust import check_folder, read_json

LABEL_FORMATS = ("index", "name", "charcnn")  # 0..K-1 | class name | 1..K
CHUNK = 2048  # texts read, tokenised, predicted and written at a time: memory stays bounded for any input
ONNX_NAMES = ("model.int8.onnx", "model.onnx")  # a folder with no PyTorch weights runs the first one found
# where an ONNX model runs: onnxruntime (int8 export by default), or OpenVINO (the fp32 export; bf16 on AMX CPUs)
RUNTIMES = ("onnxruntime", "openvino")


def check_label_format(label_format, option="--labels"):
    """The predictions' label format is one of LABEL_FORMATS; else an error naming the option that gave it."""
    if label_format not in LABEL_FORMATS:
        raise UserError(f"{option} {label_format!r}: expected one of {', '.join(LABEL_FORMATS)}")


# ---------------------------------------------------------------- reading the input

def read_input(path, size=None, layout="auto"):
    """(number of texts, a function returning the input's chunks). The whole input is
    checked first (bad rows, duplicate IDs; only the IDs are kept), so a bad file fails before any model loads.
    data.py reads it (the one reader of input files); `layout` is a headerless CSV's (readers.LAYOUTS)."""
    path, size = Path(path), size or CHUNK
    if path.suffix.lower() not in readers.STREAMED:
        split = readers.read_unlabelled(path, [], layout)
        return len(split), lambda: (split.subset(np.arange(i, min(i + size, len(split))))
                                    for i in range(0, len(split), size))
    seen, n = set(), 0
    for split in readers.unlabelled_chunks(path, size, layout):
        for i in split.ids:
            if i in seen:
                raise UserError(f"{path}: duplicate ID {i!r}")
            seen.add(i)
        n += len(split)
    if not n:
        raise UserError(f"{path}: no rows")
    return n, lambda: readers.unlabelled_chunks(path, size, layout)


# ---------------------------------------------------------------- models: run, exported folder, ONNX

def model_kind(path, runtime="onnxruntime") -> tuple[str, Path]:
    """What a model path holds: a run folder, an exported HF or adapter folder, or an ONNX file. With
    runtime openvino an export folder gives its fp32 model.onnx, the graph OpenVINO reads and speeds up itself."""
    if runtime not in RUNTIMES:
        raise UserError(f"--runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    p = Path(path)
    if p.is_file() and p.suffix == ".onnx":
        return "onnx", p
    if not p.exists():
        raise UserError(f"{p}: no such run folder or exported model")
    if p.is_dir():
        if (p / "run.json").exists():
            return "run", p
        if (p / "adapter_config.json").exists():
            return "adapter", p
        if runtime == "openvino" and (p / "model.onnx").exists():
            return "onnx", p / "model.onnx"
        if (p / "config.json").exists() and (p / "model.safetensors").exists():
            return "hf", p
        for name in ONNX_NAMES:
            if (p / name).exists():
                return "onnx", p / name
    raise UserError(f"{p}: not a lorakd run folder or exported model (no run.json, adapter_config.json, "
                    f"config.json + model.safetensors, or model.onnx)")


def _labels_of(kind, p: Path) -> list[str]:
    """Class names without loading a model: the run's config, else id2label of the exported folder."""
    if kind == "run":
        from .runs import load_run

        return list(load_run(p)[0].data.label_names)
    folder = p.parent if kind == "onnx" else p
    src = folder / ("lorakd.json" if kind == "adapter" else "config.json")
    if not src.exists():
        raise UserError(f"{folder}: no {src.name}; export the model with `lorakd export`")
    id2label = read_json(src).get("id2label")
    names = [id2label.get(str(i)) for i in range(len(id2label))] if isinstance(id2label, dict) else [None]
    if not all(isinstance(n, str) for n in names):
        raise UserError(f"{src}: id2label does not name classes 0..K-1; export the model with `lorakd export`")
    return names


# onnxruntime fusions whose CPU kernels (1.32) are slower than the plain ops they replace (bench/predict_cpu.py,
# lever table): residual Add + LayerNormalization into SkipLayerNormalization (2.4 ms where LayerNormalization
# took 0.3 ms on the same [896, 384] tensor; int8 MiniLM 23% faster without it); bias Add + Gelu into BiasGelu
# (about twice the time of Add and Gelu apart; int8 MiniLM about 10% faster without it)
SLOW_FUSIONS = ["SkipLayerNormFusion", "BiasGeluFusion"]


def onnx_session(path, threads=1):
    """An onnxruntime CPU session with the graph optimisations on (less the slow ones), on `threads` threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=SLOW_FUSIONS)


def openvino_runner(path, workers, precision=None):
    """(run(ids, mask) -> logits, the precision used) of an ONNX file compiled by OpenVINO for the CPU: `workers`
    streams of one thread each, one infer request per stream, taken by whichever thread runs a batch (infer
    releases the GIL). OpenVINO computes in bf16 on a CPU with AMX (its default there; `precision` overrides,
    e.g. "f32"): 1.2-1.3x onnxruntime's int8 export on this machine's AMX cores, and closer to PyTorch's labels
    (bench/predict_cpu.py). Without AMX it computes in fp32: onnxruntime's int8 export is then the faster one."""
    try:
        import openvino as ov
    except ImportError:
        raise UserError('--runtime openvino needs OpenVINO: pip install "lorakd[openvino]"') from None
    config = {"NUM_STREAMS": str(workers), "INFERENCE_NUM_THREADS": str(workers)}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    try:  # compiled, then one small batch: a graph OpenVINO reads but cannot run fails here, before any output
        compiled = ov.Core().compile_model(str(path), "CPU", config)
        logits, pool = compiled.output(0), [compiled.create_infer_request() for _ in range(workers)]
        probe = np.zeros((1, 8), dtype=np.int64)
        pool[0].infer({"input_ids": probe, "attention_mask": probe + 1})
    except RuntimeError as e:  # e.g. the per-row int8 graph's onnxruntime-only operators
        why = " ".join(str(e).split())[-300:] or type(e).__name__
        raise UserError(f"{path}: OpenVINO cannot run this graph (...{why}); give it the fp32 model.onnx "
                        f"of a `lorakd export --onnx` folder") from None
    requests = queue.SimpleQueue()
    for request in pool:
        requests.put(request)

    def run(ids, mask):
        request = requests.get()
        try:
            return request.infer({"input_ids": ids, "attention_mask": mask})[logits].copy()
        finally:
            requests.put(request)
    return run, compiled.get_property("INFERENCE_PRECISION_HINT").to_string()


def onnx_tokenizer(folder: Path):
    """The tokenizer beside an ONNX model: its tokenizer.json through the `tokenizers` library, the same
    tokenizer transformers' fast tokenizers run, without importing transformers and torch (about 5 s of a fresh
    `lorakd predict` on this 2-core CPU). Same ids as AutoTokenizer: tests/test_export.py. A folder without
    tokenizer.json (a slow tokenizer only) gets AutoTokenizer."""
    config = read_json(folder / "tokenizer_config.json")
    if not (folder / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        from .backbones import safe_kwargs

        return AutoTokenizer.from_pretrained(folder, **safe_kwargs(folder))
    from tokenizers import Tokenizer

    check_folder(folder)
    try:  # and one text through it: a bad post-processor panics at the first encode, not at load
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.encode("a probe text")
    except BaseException as e:  # a bad file: an Exception, or the Rust panic (pyo3's PanicException, a BaseException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise UserError(f"{folder / 'tokenizer.json'}: not a tokenizer file the tokenizers library reads "
                        f"({first_line(e)})") from None
    tok.no_padding()  # batches pad themselves (data.pad_rows)
    pad = config.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    tok.pad_token_id = tok.token_to_id(pad) if pad else None  # as AutoTokenizer's; data.pad_id pads with it
    tok.model_max_length = config.get("model_max_length") or 512
    return tok


def open_model(kind, p: Path, device="auto", backbone=None, threads=0, runtime="onnxruntime"):
    """The model behind a path, loaded once: an inference.TrainedModel, or an OnnxModel with its interface.
    ONNX models load without transformers and torch, which a fresh process would spend seconds importing."""
    if backbone and kind not in ("run", "adapter"):
        raise UserError("--backbone applies to run folders and adapter folders only")
    if runtime == "openvino" and kind != "onnx":
        raise UserError(f"{p}: --runtime openvino runs an ONNX model: export it first (lorakd export RUN --onnx) "
                        f"and give the export folder or its model.onnx")
    if kind == "onnx":
        return _open_onnx(p, threads, runtime)
    import torch

    from . import graphs, inference

    if threads:
        torch.set_num_threads(threads)
    dev = graphs.pick_device(device, key="--device")
    if kind == "run":
        return inference.open_run(p, dev, backbone)
    return inference.open_folder(kind, p, dev, _labels_of(kind, p), backbone)


def _open_onnx(p: Path, threads, runtime):
    for need in ("config.json", "tokenizer_config.json"):
        if not (p.parent / need).exists():
            raise UserError(f"{p}: no {need} beside it; predict on a folder written by lorakd export --onnx")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = threads or cores
    tok = onnx_tokenizer(p.parent)
    max_length = data_lib.folder_max_length(tok)
    if runtime == "openvino":  # padded to a multiple of 16 tokens: fewer shapes for OpenVINO to prepare
        run, precision = openvino_runner(p, workers)
        return OnnxModel(tok, max_length, run, workers, f"cpu, OpenVINO {p.name} ({precision})", pad_multiple=16)
    try:
        # small batches on one thread each, one batch per core at a time: on a CPU this beats
        # splitting each batch's matrix products across cores (measured: bench/predict_cpu.py)
        sess = onnx_session(p, 1)
    except ImportError:
        raise UserError('running an ONNX model needs onnxruntime: pip install "lorakd[onnx]"') from None
    except Exception as e:  # onnxruntime's refusals (a broken graph, external data outside the folder)
        raise UserError(f"{p}: onnxruntime cannot load this model ({' '.join(str(e).split())[:200]})") from None
    run = lambda ids, mask: sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]  # noqa: E731
    return OnnxModel(tok, max_length, run, workers, f"cpu, onnxruntime {p.name}")


@dataclass(frozen=True)
class OnnxModel:
    """An ONNX model with inference.TrainedModel's interface (tok, max_length, pad_id, device, logits), in numpy:
    run(ids, mask) -> logits, `workers` batches at a time (onnxruntime and OpenVINO release the GIL)."""
    tok: object
    max_length: int
    run: Callable
    workers: int
    device: str
    pad_multiple: int = 1

    @property
    def pad_id(self) -> int:
        return data_lib.pad_id(self.tok)

    def logits(self, texts, batch_size) -> np.ndarray:
        """Logits [N, C] in input order; batches of similar length, padded only to their longest text."""
        encoded = data_lib.encode(self.tok, texts, self.max_length)
        order = np.argsort([-len(e) for e in encoded], kind="stable")
        batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]

        def run(idx):
            return self.run(*data_lib.pad_rows([encoded[i] for i in idx], self.pad_id, self.pad_multiple,
                                               self.max_length))

        if self.workers > 1:  # threads run batches side by side
            with ThreadPoolExecutor(self.workers) as pool:
                outs = list(pool.map(run, batches))
        else:
            outs = [run(idx) for idx in batches]
        out = np.empty((len(texts), outs[0].shape[-1]), dtype=np.float32)
        for idx, logits in zip(batches, outs):
            out[idx] = logits
        return out


def logits_of(m, texts, batch_size) -> np.ndarray:
    """m's logits [N, C] in input order, as numpy (a TrainedModel's come as a CPU tensor)."""
    return np.asarray(m.logits(texts, batch_size))


# ---------------------------------------------------------------- predict

def check_options(batch_size, threads, layout="auto"):
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if threads < 0:
        raise UserError(f"--threads {threads}: must be >= 0 (0 = one per core)")
    if layout not in readers.LAYOUTS:  # checked here too: a file with a header never asks
        raise UserError(f"--layout {layout!r}: expected one of {', '.join(readers.LAYOUTS)}")


def default_batch_size(kind, runtime) -> int:
    # onnxruntime on a CPU: small batches on each core, their activations stay in the core's cache; OpenVINO's
    # AMX products want more rows (both measured: bench/predict_cpu.py); PyTorch takes 256 at once
    return {"onnxruntime": 8, "openvino": 64}[runtime] if kind == "onnx" else 256


def check_out(out_path: Path, input_path: Path, model_path: Path):
    """--out may replace an earlier predictions file, never what this command reads: the input, or a file of
    the model (run.json, weights, tokenizer) that a later command would need."""
    blocker = next((p for p in out_path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"--out {out_path}: {blocker} is a file, not a folder")
    if out_path.is_dir():
        raise UserError(f"--out {out_path}: is a folder; name the CSV file to write")
    if not out_path.exists():
        return
    if input_path.exists() and out_path.samefile(input_path):
        raise UserError(f"--out {out_path}: is the input file; write the predictions to another file")
    model_dir = (model_path if model_path.is_dir() else model_path.parent).resolve()
    if model_dir in out_path.resolve().parents and out_path.suffix.lower() != ".csv":
        raise UserError(f"--out {out_path}: a file of the model in {model_dir}; write the predictions elsewhere")


def predict(run_dir, input_path, out_path, device="auto", batch_size=None, label_format="index",
            backbone=None, threads=0, progress=None, log=print, runtime="onnxruntime", scores=False,
            layout="auto") -> dict:
    """Predict every text of input_path with the model at run_dir (a run, an export or an .onnx file).
    scores: also one probability column per class (softmax of the logits, named by the class) and the top
    one (Score). layout: a headerless CSV's, readers.LAYOUTS."""
    from tqdm import tqdm

    check_label_format(label_format)
    check_options(batch_size, threads, layout)
    kind, path = model_kind(run_dir, runtime)
    names = _labels_of(kind, path)
    out_path = Path(out_path)
    check_out(out_path, Path(input_path), path)
    n, chunks = read_input(input_path, layout=layout)  # a bad file fails here, in a moment, before the model loads
    id_column = next(chunks()).id_column or "ID"  # the input's own name for it ("id" stays "id")
    header = [id_column, "Label"] + (list(names) + ["Score"] if scores else [])
    if len(set(header)) < len(header):
        raise UserError(f"--scores: a class name is also the column {id_column}, Label or Score: the output "
                        f"would name a column twice ({', '.join(header)})")
    m = open_model(kind, path, device, backbone, threads, runtime)
    batch_size = batch_size or default_batch_size(kind, runtime)
    t0 = time.perf_counter()

    def write(f):  # atomic: a kill or a full disk leaves the old output; the file gets the usual permissions
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        w = csv.writer(text, lineterminator="\n")
        w.writerow(header)
        for split in chunks():
            logits = logits_of(m, split.texts, batch_size)
            probs = probabilities(logits) if scores else None
            for row, (i, p) in enumerate(zip(split.ids, logits.argmax(-1).tolist())):
                label = {"index": p, "name": names[p], "charcnn": p + 1}[label_format]
                w.writerow([atomic.csv_cell(i), atomic.csv_cell(label)]  # IDs and names: never a formula
                            + ([f"{q:.6f}" for q in probs[row]] + [f"{probs[row, p]:.6f}"] if scores else []))
            bar.update(len(split))
        text.flush()
        text.detach()  # the binary file stays open for the fsync and rename

    with tqdm(total=n, unit="text", desc="predict", disable=None if progress is None else not progress) as bar:
        atomic.write_stream(out_path, write)
    seconds = time.perf_counter() - t0
    stats = {"n": n, "seconds": seconds, "texts_per_s": n / max(seconds, 1e-9), "device": str(m.device)}
    log(f"wrote {n:,} predictions to {out_path} ({stats['texts_per_s']:.0f} texts/s on {m.device})")
    return stats


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over classes (in float64), each row summing to 1."""
    e = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def predict_texts(run_dir, texts, device="auto", batch_size=None, backbone=None, threads=0,
                  runtime="onnxruntime") -> tuple[list[str], np.ndarray]:
    """(class names, probabilities [N, C]) of texts in memory: the model opened and batched as predict() does."""
    check_options(batch_size, threads)
    kind, path = model_kind(run_dir, runtime)
    names = _labels_of(kind, path)
    texts = [row_text(t, None, f"texts[{i}]") for i, t in enumerate(texts)]  # the rule for a file's rows
    if not texts:
        raise UserError("no texts to predict")
    m = open_model(kind, path, device, backbone, threads, runtime)
    return names, probabilities(logits_of(m, texts, batch_size or default_batch_size(kind, runtime)))


from .package import callable_module  # noqa: E402

callable_module(__name__)  # lorakd.predict(...) runs the API call lorakd.api.predict (lorakd/package.py)
