"""One frozen, typed config: dataclasses that round-trip to YAML and take `section.key=value` overrides, every
value checked. The YAML files themselves are read (and presets found) by yaml_files."""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from .errors import UserError, brief
from .yaml_files import Loader, read_yaml

AG_NEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # folder (train.csv/test.csv, .parquet, .jsonl), one file, or hub:ag_news
    val_fraction: float = 0.05  # carved from train, stratified and seeded
    max_length: int = 128  # tokens; longer texts are truncated
    max_train_samples: int = 0  # 0 = all; the first N after the split (quick runs)
    repeat: int = 1  # repeat the training split N times (full-scale timing on the sample)
    label_names: tuple[str, ...] = AG_NEWS_LABELS
    group_by_length: bool = True  # batches of similar lengths: less padding, few shapes
    pad_multiple: int = 0  # batches pad to a multiple of N: fewer shapes (CUDA graphs) against more padding; 0 = auto
    labelled: int = 0  # keep N stratified labelled train rows (0 = all); the rest become transfer rows (unused without a teacher)
    split_seed: int = -1  # seed of the validation carve and data.labelled; -1 = train.seed (fix it to vary only the init)


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "embedded:minilm"  # embedded:minilm, a local folder, or a hub id
    full_finetune: bool = False  # teachers: every weight trains, no adapters
    r: int = 6
    alpha: float = 16.0
    dropout: float = 0.05
    backbone_dropout: float = -1.0  # hidden and attention dropout inside the backbone; -1 = its own (0.1)
    targets: tuple[str, ...] = ("query", "key", "value")
    layers: tuple[int, ...] = ()  # empty = every layer
    budget: int = 1_000_000  # trainable-parameter limit for students; 0 = none
    attention: str = "auto"  # auto (transformers' pick: sdpa where the architecture has it) | eager | sdpa


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 2e-4
    batch_size: int = 24  # global: split across processes in multi-GPU runs; with grad_accum, one micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (effective batch batch_size * N); steps count updates
    epochs: float = 3.0
    max_steps: int = 0  # 0 = from epochs
    weight_decay: float = 0.01
    schedule: str = "polynomial"  # linear | cosine | polynomial | constant, each after the warmup
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 = off
    seed: int = 42
    log_every: int = 20  # steps between train-loss records
    eval_every: int = 0  # steps between evaluations; 0 = each epoch
    early_stop_patience: int = 0  # stop after N evaluations without a better validation accuracy; 0 = off
    # resumable checkpoints: every N steps and/or every M minutes of wall time (0 = off; both off = only on SIGTERM or
    # Ctrl-C). By time by default: a GPU step takes milliseconds, and a full fine-tune's checkpoint seconds.
    checkpoint_every: int = 0
    checkpoint_minutes: float = 5.0
    eval_batch_size: int = 256
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on GPU) | bf16 | fp32
    cuda_graphs: str = "auto"  # auto (on GPU) | on | off: one CUDA graph per shape bucket
    threads: int = 0  # CPU threads; 0 = torch default
    tensorboard: bool = False
    compile: bool = False  # torch.compile (inductor) the model: a lever, off unless measured to win (docs/speed.md)
    prewarm: bool = True  # GPU: small encoder-shaped steps warm it in the background while imports run (docs/speed.md)
    capture_warmups: int = 0  # GPU: eager steps before capturing each graph shape after the first (docs/speed.md)


@dataclass(frozen=True)
class DistillConfig:
    teachers: tuple[str, ...] = ()  # run folders of finished teachers
    weights: tuple[float, ...] = ()  # per teacher; empty = equal
    alpha: float = 0.5  # weight of CE; (1 - alpha) on T^2 * KL
    temperature: float = 2.0
    rest_as_transfer: bool = True  # the train rows data.labelled leaves out join as transfer rows
    unlabeled: str = ""  # texts without labels (any format predict reads): transfer rows the teachers label
    augment: int = 0  # N seeded augmented copies of each labelled text, added as transfer rows
    augment_ops: tuple[str, ...] = ("delete", "swap")  # delete | swap | mask | mix (docs/distillation.md)
    augment_scope: str = "labelled"  # labelled: copies of the labelled texts | all: of the transfer texts too
    transfer_targets: str = "soft"  # soft: KD on transfer rows | hard: CE on the teachers' argmax (self-training)
    max_transfer: int = 0  # at most N transfer rows (0 = all), a seeded sample
    # the pipeline's own teachers (lorakd pipeline; README: Distillation at scale)
    teacher_rounds: int = 1  # noisy-student rounds: round k's teacher trains on the labels plus round k-1's labels of the transfer rows
    teacher_ensemble: int = 1  # teachers per round (seeds train.seed, +1, ...); the next round and the student learn their average
    round_augment: int = 0  # rounds 2+: augmented copies of each labelled text as transfer rows (noise beside dropout)
    round_targets: str = "soft"  # rounds 2+: soft (KD on the transfer rows) | hard (CE on the previous round's argmax)
    round_ensemble: int = 0  # rounds 2+: teachers per round (0 = teacher_ensemble)
    round_epochs: int = 0  # rounds 2+: the teacher's epochs over labels + transfer rows (0 = its train.epochs)


@dataclass(frozen=True)
class Config:
    name: str = "run"
    role: str = "student"  # student (budget enforced) | teacher
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


CHOICES = {
    "role": ("student", "teacher"),
    "train.schedule": ("linear", "cosine", "polynomial", "constant"),
    "train.precision": ("auto", "bf16", "fp32"),
    "train.cuda_graphs": ("auto", "on", "off"),
    "model.attention": ("auto", "eager", "sdpa"),
    "distill.transfer_targets": ("soft", "hard"),
    "distill.augment_scope": ("labelled", "all"),
    "distill.round_targets": ("soft", "hard"),
}
AUGMENT_OPS = ("delete", "swap", "mask", "mix")


def _coerce(value, tp, key):
    """Check and convert one YAML value to the field's type, naming the key when it does not fit."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if value is None:
            value = []
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {key}: expected a list, got {brief(value)}")
        return tuple(_coerce(v, item_tp, key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise UserError(f"config key {key}: expected true or false, got {brief(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UserError(f"config key {key}: expected an integer, got {brief(value)}")
        if isinstance(value, int) and abs(value) >= 2 ** 63:
            raise UserError(f"config key {key}: {value} is too large")
        if isinstance(value, int):  # as is: a float would round a large one
            return value
        try:
            f = float(value)
        except ValueError:
            raise UserError(f"config key {key}: expected an integer, got {brief(value)}") from None
        if not math.isfinite(f) or f != int(f):
            raise UserError(f"config key {key}: expected an integer, got {brief(value)}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"config key {key}: expected a number, got {brief(value)}")
        try:
            f = float(value)
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"config key {key}: expected a number, got {brief(value)}") from None
        if not math.isfinite(f):
            raise UserError(f"config key {key}: expected a finite number, got {brief(value)}")
        return f
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise UserError(f"config key {key}: expected text, got {brief(value)}")
        return str(value)
    raise TypeError(tp)


def _build(cls, raw, prefix=""):
    if not isinstance(raw, dict):
        raise UserError(f"config section {prefix.rstrip('.') or '(top)'}: expected a mapping, got {brief(raw)}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known, key=str)  # YAML keys may be numbers or null
    if unknown:
        key = f"{prefix}{unknown[0]}"
        key = key if key.isprintable() else repr(key)  # a line break in a key would split the one-line error
        close = difflib.get_close_matches(str(unknown[0]), sorted(known), n=1)
        hint = f"did you mean {prefix}{close[0]}? " if close else ""
        raise UserError(f"unknown config key {key} ({hint}known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, {} if value is None else value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
    return out


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _set_dotted(raw: dict, key: str, value):
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        if node.get(p) is None:  # an empty section (`data:` in YAML) takes keys
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise UserError(f"override {key}: {p} is not a section")
    node[parts[-1]] = value


def parse_override(text: str):
    if "=" not in text:
        raise UserError(f"override {text!r}: expected key=value, e.g. model.r=8")
    key, value = text.split("=", 1)
    if not key.strip():
        raise UserError(f"override {text!r}: no key before '=', e.g. model.r=8")
    if "" in (part.strip() for part in key.split(".")):
        raise UserError(f"override {text!r}: the key {key.strip()!r} has an empty part, e.g. model.r=8")
    if value.strip().startswith("[") != value.strip().endswith("]"):
        raise UserError(f"override {text!r}: a list needs both brackets, e.g. model.targets=[query,value]")
    try:
        parsed = yaml.load(value, Loader=Loader) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def merge(raw: dict, overrides: dict) -> dict:
    """Deep-merge overrides (nested or dotted keys) into a copy of raw."""
    out = yaml.safe_load(yaml.safe_dump(raw)) if raw else {}
    for key, value in overrides.items():
        if isinstance(value, dict) and "." not in key and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            _set_dotted(out, key, value)
    return out


def from_dict(raw: dict) -> Config:
    cfg = _build(Config, raw)
    validate(cfg)
    return absolute_paths(cfg)


def _absolute(value: str) -> str:
    """A local file or folder as an absolute path; anything else (a hub id, embedded:*, hub:*, a path that
    does not exist, whose error then names it as typed) unchanged."""
    if not value or re.match(r"^[A-Za-z][\w.+-]*:", value) or not Path(value).exists():
        return value
    return os.path.abspath(value)


def absolute_paths(cfg: Config) -> Config:
    """The config with its local paths absolute, so that a run's config.yaml (eval, resume, export's
    calibration texts) works from any folder, not only from where it was trained."""
    return replace(cfg, data=replace(cfg.data, path=_absolute(cfg.data.path)),
                   model=replace(cfg.model, backbone=_absolute(cfg.model.backbone)),
                   distill=replace(cfg.distill, unlabeled=_absolute(cfg.distill.unlabeled),
                                   teachers=tuple(_absolute(t) for t in cfg.distill.teachers)))


def load(path=None, overrides=(), extra: dict | None = None) -> Config:
    """Config from a YAML file (or defaults), then `extra` (dict), then `key=value` strings."""
    raw = read_yaml(path) if path else {}
    raw = merge(raw, extra or {})
    raw = merge(raw, dict(parse_override(o) for o in overrides))
    return from_dict(raw)


def override(cfg: Config, **dotted) -> Config:
    """A copy of cfg with dotted keys changed, e.g. override(cfg, **{"model.r": 8})."""
    return from_dict(merge(to_dict(cfg), dotted))


def safe_name(name) -> bool:
    """A run's, pipeline's or sweep's `name` is a folder name, not a path: one component, no '/', '\\', NUL or
    line break, not '.', '..' nor hidden (a config from elsewhere must not place a run outside runs/)."""
    return (isinstance(name, str) and 0 < len(name) <= 200 and name.isprintable() and not name.startswith(".")
            and not any(c in name for c in "/\\"))


# key: (the lowest value it takes, what that lowest value means): the plain lower bounds, checked first
AT_LEAST = {
    "model.r": (1, ""),
    "model.budget": (0, ""),
    "train.batch_size": (1, ""),
    "train.max_steps": (0, ""),
    "train.weight_decay": (0, ""),
    "train.grad_clip": (0, ""),
    "train.grad_accum": (1, ""),
    "train.log_every": (1, ""),
    "train.early_stop_patience": (0, "0 = off"),
    "train.eval_every": (0, ""),
    "train.checkpoint_every": (0, "0 = off"),
    "train.checkpoint_minutes": (0, "0 = off"),
    "train.eval_batch_size": (1, ""),
    "train.threads": (0, "0 = torch's default"),
    "data.max_length": (8, ""),
    "data.repeat": (1, ""),
    "data.max_train_samples": (0, ""),
    "data.labelled": (0, "0 = every row"),
    "distill.augment": (0, ""),
    "distill.max_transfer": (0, ""),
    "distill.teacher_rounds": (1, ""),
    "distill.teacher_ensemble": (1, ""),
    "distill.round_augment": (0, ""),
    "distill.round_ensemble": (0, "0 = distill.teacher_ensemble"),
    "distill.round_epochs": (0, "0 = the teacher's train.epochs"),
}


def validate(cfg: Config):
    flat = flatten(cfg)
    if not safe_name(cfg.name):
        raise UserError(f"config key name: {brief(cfg.name)} must be a plain folder name (no '/', '..', leading "
                        f"'.' or line break), e.g. minilm-r6")
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise UserError(f"config key {key}: {brief(flat[key])} is not one of {', '.join(allowed)}")
    for key, (low, note) in AT_LEAST.items():
        if flat[key] < low:
            raise UserError(f"config key {key}: {brief(flat[key])} must be " + (f"at least {low}" if low else ">= 0")
                            + (f" ({note})" if note else ""))
    for ok, key, msg in _checks(cfg):
        if not ok:
            raise UserError(f"config key {key}: {brief(flat[key])} {msg}")


def _checks(cfg: Config) -> list[tuple[bool, str, str]]:
    """(holds, key, what it must be) for every value rule of the config."""
    m, t, d, dc = cfg.model, cfg.train, cfg.data, cfg.distill
    return [
        (m.alpha > 0, "model.alpha", "must be positive"),
        (0 <= m.dropout < 1, "model.dropout", "must be in [0, 1)"),
        (m.full_finetune or len(m.targets) > 0, "model.targets", "needs at least one module name"),
        (all(layer >= 0 for layer in m.layers), "model.layers", "layer indices start at 0"),
        (t.lr > 0, "train.lr", "must be positive"),
        (t.epochs > 0 or t.max_steps > 0, "train.epochs", "must be positive (or set train.max_steps)"),
        (0 <= t.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)"),
        (m.backbone_dropout == -1.0 or 0.0 <= m.backbone_dropout < 1.0, "model.backbone_dropout",
         "must be in [0, 1), or -1 for the backbone's own"),
        (0 <= t.capture_warmups <= 10, "train.capture_warmups", "must be between 0 and 10"),
        (0 <= d.val_fraction < 1, "data.val_fraction", "must be in [0, 1)"),
        (d.pad_multiple == 0 or (d.pad_multiple >= 1 and d.max_length % d.pad_multiple == 0), "data.pad_multiple",
         "must be 0 (auto) or divide data.max_length (a padded batch never exceeds it)"),
        (not dc.augment or dc.augment_ops, "distill.augment_ops", "needs at least one op when distill.augment > 0"),
        (not d.labelled or d.labelled >= len(d.label_names), "data.labelled",
         f"gives some of the {len(d.label_names)} classes no labelled row (0 = every row)"),
        (all(op in AUGMENT_OPS for op in dc.augment_ops), "distill.augment_ops",
         f"takes only {', '.join(AUGMENT_OPS)}"),
        (len(d.label_names) >= 2, "data.label_names", "needs at least two classes"),
        (len(set(d.label_names)) == len(d.label_names), "data.label_names", "has duplicates"),
        (0 <= dc.alpha <= 1, "distill.alpha", "must be in [0, 1]"),
        (dc.temperature > 0, "distill.temperature", "must be positive"),
        (not dc.weights or len(dc.weights) == len(dc.teachers), "distill.weights", "needs one weight per teacher"),
        (all(w >= 0 for w in dc.weights) and (not dc.weights or sum(dc.weights) > 0), "distill.weights",
         "must be non-negative and not all zero"),
    ]


def changed_key(old: Config, new: Config, ignore=()) -> str | None:
    """The first key, in config order, whose value differs between two configs; keys in `ignore` left out."""
    a, b = flatten(old), flatten(new)
    return next((k for k in b if k not in ignore and a.get(k) != b[k]), None)


def flatten(cfg) -> dict:
    """{'model.r': 6, ...}: the form that sweeps, reports and overrides use."""
    out = {}
    for k, v in to_dict(cfg).items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": (tuple(vv) if isinstance(vv, list) else vv) for kk, vv in v.items()})
        else:
            out[k] = v
    return out


__all__ = ["Config", "DataConfig", "ModelConfig", "TrainConfig", "DistillConfig", "load", "from_dict",
           "to_dict", "to_yaml", "flatten", "override", "merge", "parse_override", "replace"]


def fmt_value(key: str, value) -> str:
    """A config value as one short string: lists joined with '+', an empty layer list is 'all'."""
    if isinstance(value, (list, tuple)):
        if not value:
            return "all" if key.endswith("layers") else "-"
        return "+".join(fmt_value(key, v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
