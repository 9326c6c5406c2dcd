"""The Python API: what the `lorakd` command runs, callable from a notebook or a script.

    import lorakd
    cfg = lorakd.load_config("agnews-minilm", data="../shared/data/ag_news", overrides=["train.epochs=1"])
    run = lorakd.train(cfg, out="runs/x")             # TrainResult: run_dir, accuracy, trainable, ...
    pred = lorakd.predict("runs/x", ["Stocks rally as oil falls"])   # Predictions: labels, probs

Each call returns a small frozen result and raises lorakd.errors.UserError, with the command's one-line message,
on bad input. The command line parses its options, calls these, and prints: one path for both. Imports of torch
and transformers happen inside the calls, so that `import lorakd` stays quick.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from . import config as config_lib
from .errors import UserError
from .yaml_files import preset_path, read_yaml

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    accuracy: float | None  # validation accuracy of the kept (best) weights; None without a validation split
    test_accuracy: float | None  # None without test data
    trainable: int
    total: int
    steps: int
    train_time_s: float
    summary: dict = field(repr=False)  # run.json's summary: samples/s, phases, device, ...

    @classmethod
    def of(cls, run_dir, summary: dict) -> TrainResult:
        return cls(Path(run_dir), summary.get("validation_accuracy"), summary.get("test_accuracy"),
                   summary["trainable"], summary["total"], summary["steps"], summary["train_time_s"], summary)


@dataclass(frozen=True)
class EvalResult:
    run_dir: Path
    split: str
    accuracy: float
    macro_f1: float
    loss: float
    n: int
    metrics: dict = field(repr=False)  # what eval.json holds for the split: per_class, confusion, labels


@dataclass(frozen=True, eq=False)  # eq=False: arrays do not compare to one truth value
class Predictions:
    labels: np.ndarray  # int64 [N]: each text's class index
    label_names: tuple[str, ...]  # the classes, by index
    probs: np.ndarray  # float32 [N, C]: softmax of the logits, rows sum to 1

    @property
    def names(self) -> list[str]:
        """Each text's class name."""
        return [self.label_names[i] for i in self.labels]

    def __len__(self):
        return len(self.labels)


@dataclass(frozen=True)
class PredictFileResult:
    out: Path
    n: int
    seconds: float
    texts_per_s: float
    device: str


@dataclass(frozen=True)
class ExportResult:
    out: Path
    kind: str  # merged | adapter
    files: dict  # file name -> bytes
    details: dict = field(repr=False)  # ONNX checks (onnx_max_abs_diff, ...) when onnx=True


@dataclass(frozen=True)
class PipelineResult:
    root: Path
    teacher_dir: Path
    student_dir: Path
    stages: dict  # stage -> trained | skipped | cached | written
    teacher_accuracy: float | None  # validation accuracies
    student_accuracy: float | None
    predictions: Path | None  # ROOT/predictions.csv when predict= was given
    summary: dict = field(repr=False)  # pipeline.json


def _override_list(overrides) -> list[str]:
    return [overrides] if isinstance(overrides, str) else list(overrides)


def load_config(config=None, *, data=None, budget=None, overrides=()) -> config_lib.Config:
    """A config from a preset name or YAML file (None: the defaults), then data (data.path) and budget
    (model.budget), then overrides: "key=value" strings as on the command line, or a {key: value} dict."""
    extra = {}
    if data:
        extra["data.path"] = str(data)
    if budget is not None:
        extra["model.budget"] = budget
    if isinstance(overrides, Mapping):
        extra, overrides = {**extra, **overrides}, ()
    path = preset_path(str(config)) if config else None
    return config_lib.load(path, _override_list(overrides), extra)


def default_run_dir(cfg, root="runs") -> Path:
    return Path(root) / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def train(cfg=None, out=None, *, resume=None, plots=True, log=print) -> TrainResult:
    """Train one run into `out` (default runs/NAME-TIMESTAMP). cfg: a Config, or a preset name or YAML file.
    resume=RUN continues a killed run from its last checkpoint, with the run's own config and folder."""
    from . import runs
    from .train import train as train_run

    if resume:
        if cfg is not None or out is not None:
            raise UserError("resume takes the run's own config and folder: give no config and no out")
        run_dir = Path(resume)
        cfg, _ = runs.load_run(run_dir)
    else:
        if cfg is None:
            raise UserError("train: give a config (lorakd.load_config) or resume=RUN")
        if not isinstance(cfg, config_lib.Config):
            cfg = load_config(cfg)
        run_dir = Path(out) if out else default_run_dir(cfg)
    with runs.run_lock(run_dir):
        summary = train_run(cfg, run_dir, resume=bool(resume), log=log, plots=plots)
    return TrainResult.of(run_dir, summary)


def pipeline(config, *, data=None, out=None, overrides=(), predict=None, predict_labels="index",
             log=print) -> PipelineResult:
    """Teacher -> teacher logits -> student -> evaluation -> predictions of `predict` (a file), from a pipeline
    preset or YAML file (one with a `teacher:` section) into `out` (default runs/NAME); finished stages are
    skipped. overrides: "key=value" (the student's, and the teacher's where its section does not set the key)
    and "teacher.key=value" (the teacher's alone). predict_labels: index, name or charcnn, as predict's."""
    from contextlib import ExitStack

    from .pipeline import pipeline_root, run_pipeline, split_configs, teacher_names
    from .runs import run_lock

    path, overrides = preset_path(str(config)), _override_list(overrides)
    root = pipeline_root(path, overrides, out, data)
    student = split_configs(read_yaml(path), overrides, data)[1]
    # its own folder, and the runs in it: a `lorakd train --resume ROOT/student` meanwhile is refused too
    with ExitStack() as locks:
        for name in ["", *(n for names in teacher_names(student) for n in names), "student"]:
            locks.enter_context(run_lock(root / name))
        s = run_pipeline(path, overrides, out=root, data=data, predict_input=predict, log=log,
                         predict_labels=predict_labels)
    root = Path(root)  # the folders as given (pipeline.json holds them absolute)
    return PipelineResult(root, root / "teacher", root / "student", s["stages"],
                          (s["teacher_summary"] or {}).get("validation_accuracy"),
                          (s["student_summary"] or {}).get("validation_accuracy"),
                          root / "predictions.csv" if "predictions" in s else None, s)


def evaluate(run, split="validation", *, device="auto", backbone=None, log=print) -> EvalResult:
    """Evaluate a finished run on its validation or test split; eval.json is updated. backbone: a local copy
    of the run's backbone."""
    from .evaluate import evaluate_run
    from .runs import load_run, run_lock

    load_run(run)  # a folder that is not a run is refused before a lock file is put in it
    with run_lock(run):  # eval.json is read, updated and written back
        m = evaluate_run(run, split, device=device, backbone=backbone, log=log)
    return EvalResult(Path(run), split, m["accuracy"], m["macro_f1"], m["loss"], m["n"], m)


def predict(model, texts, *, batch_size=None, device="auto", backbone=None, threads=0,
            runtime="onnxruntime") -> Predictions:
    """Class and probabilities of each text (a list of strings, or one string) from a run folder, an exported
    folder or an .onnx file, as `lorakd predict` computes them."""
    from .predict import predict_texts

    names, probs = predict_texts(model, [texts] if isinstance(texts, str) else texts, device, batch_size,
                                 backbone, threads, runtime)
    return Predictions(probs.argmax(-1), tuple(names), probs)


def predict_file(model, input, out, *, labels="index", batch_size=None, device="auto", backbone=None, threads=0,
                 runtime="onnxruntime", progress=None, log=print, **options) -> PredictFileResult:
    """`lorakd predict`: every text of a CSV, JSONL or pickle file, written to the CSV `out` (ID,Label; labels:
    index, name or charcnn). options: the further options of lorakd.predict.predict."""
    from .predict import predict as predict_run

    stats = predict_run(model, input, out, device=device, batch_size=batch_size, label_format=labels,
                        backbone=backbone, threads=threads, progress=progress, log=log, runtime=runtime, **options)
    return PredictFileResult(Path(out), stats["n"], stats["seconds"], stats["texts_per_s"], stats["device"])


def export(run, out=None, *, adapter_only=False, onnx=False, backbone=None, log=print) -> ExportResult:
    """A finished run as a Hugging Face folder (LoRA merged; default RUN/export), or a peft adapter folder
    (adapter_only; default RUN/export-adapter); onnx adds model.onnx (fp32) and model.int8.onnx."""
    from .export import export as export_run

    r = export_run(run, out, adapter_only=adapter_only, onnx=onnx, backbone=backbone, log=log)
    return ExportResult(Path(r["out"]), r["kind"], r["files"],
                        {k: v for k, v in r.items() if k not in ("out", "kind", "files")})
