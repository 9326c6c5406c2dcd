"""Pipeline: teacher -> teacher logits -> student -> evaluation -> predictions, in one command.

Each stage is skipped when its output exists and matches (same config, finished); a run folder that
holds a different config is never overwritten."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

from . import atomic
from . import config as config_lib
from .errors import UserError
from .runs import read_json, run_state
from .yaml_files import read_yaml


def split_configs(raw: dict, overrides=(), data=None):
    """(teacher config, student config) from one YAML: the student's keys, plus a `teacher:` section
    whose keys override the student's for the teacher (role teacher, full fine-tune unless it says)."""
    raw = dict(raw)
    teacher_raw = raw.pop("teacher", None) or {}
    if not isinstance(teacher_raw, dict):
        raise UserError("pipeline config: `teacher` must be a mapping of config keys")
    student_over, teacher_over = {}, {}
    for o in overrides:
        key, value = config_lib.parse_override(o)
        if key.startswith("teacher.distill"):
            raise UserError(f"override {o!r}: a pipeline's teacher trains on labels alone; distill.* keys are "
                            f"the student's")
        if key.startswith("teacher."):
            teacher_over[key.removeprefix("teacher.")] = value
        else:
            student_over[key] = value
    if data:
        student_over["data.path"] = data
    student_raw = config_lib.merge(raw, student_over)
    base = {k: v for k, v in student_raw.items() if k != "distill"}
    name = student_raw.get("name", "pipeline")
    student = config_lib.from_dict(student_raw)  # first: an error in the shared keys is the student's
    try:
        teacher = config_lib.from_dict(config_lib.merge(config_lib.merge(
            config_lib.merge(base, {"role": "teacher", "name": f"{name}-teacher", "model.full_finetune": True}),
            teacher_raw), teacher_over))
    except UserError as e:  # the key as the user wrote it: teacher.train.lr, not train.lr
        raise UserError(str(e).replace("config key ", "config key teacher.", 1)) from None
    return teacher, student


LORA_KEYS = ("model.r", "model.alpha", "model.dropout", "model.targets", "model.layers")


def _changed_key(have, want):
    """The first config key whose value differs, leaving out what such a run does not use: a full fine-tune's
    LoRA keys and a teacher's budget (a plain key=value reaches the teacher too: split_configs)."""
    unused = set()
    if have.model.full_finetune and want.model.full_finetune:
        unused.update(LORA_KEYS)
    if have.role == want.role == "teacher":
        unused.add("model.budget")
    return config_lib.changed_key(have, want, ignore=unused)


def _train_stage(name, cfg, run_dir, log):
    from .train import train

    state = run_state(run_dir, cfg, _changed_key)
    if state == "done":
        log(f"[{name}] done already: {run_dir}")
        return "skipped"
    log(f"[{name}] {'resuming' if state == 'partial' else 'training'}: {run_dir}")
    train(cfg, run_dir, resume=state == "partial", log=log, plots=True)
    return "trained"


def _file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def pipeline_root(config_path, overrides=(), out=None, data=None) -> Path:
    """The pipeline's folder: out, else runs/NAME (the student's name)."""
    return Path(out or Path("runs") / split_configs(read_yaml(config_path), overrides, data)[1].name)


def teacher_names(student_cfg) -> list[list[str]]:
    """The pipeline's own teachers' folder names, round by round: distill.teacher_ensemble seeds round 1,
    distill.round_ensemble (else the same) each later round (`teacher` is round 1's first, as before rounds existed)."""
    dc = student_cfg.distill
    sizes = [dc.teacher_ensemble] + [dc.round_ensemble or dc.teacher_ensemble] * (dc.teacher_rounds - 1)
    return [["teacher" if (r, m) == (1, 0) else f"teacher-r{r}" + (f"-{m + 1}" if n > 1 else "")
             for m in range(n)] for r, n in enumerate(sizes, 1)]


def round_config(teacher_cfg, student_cfg, member: int, previous: list[Path]):
    """One teacher of a round. Member m trains with seed train.seed + m on the same split. A later round is a
    noisy student of the previous one: the labels plus the transfer rows with the previous round's (averaged)
    targets, its own dropout on, distill.round_augment copies of each labelled text, and distill.round_epochs."""
    over = {}
    if member:
        split = teacher_cfg.data.split_seed if teacher_cfg.data.split_seed >= 0 else teacher_cfg.train.seed
        over.update({"train.seed": teacher_cfg.train.seed + member, "data.split_seed": split})
    if previous:
        dc = student_cfg.distill
        over.update({"distill.teachers": [str(p) for p in previous], "distill.alpha": dc.alpha,
                     "distill.temperature": dc.temperature, "distill.rest_as_transfer": dc.rest_as_transfer,
                     "distill.unlabeled": dc.unlabeled, "distill.augment": dc.round_augment,
                     "distill.transfer_targets": dc.round_targets, "distill.max_transfer": dc.max_transfer})
        if dc.round_epochs:
            over["train.epochs"] = dc.round_epochs
    return config_lib.override(teacher_cfg, **over) if over else teacher_cfg


def _predict_stage(root: Path, student_dir: Path, predict_input, label_format, log) -> str:
    """predictions.csv of the student over predict_input, skipped while both (by their hashes) and the label
    format are unchanged."""
    from .logits_cache import weights_hash
    from .predict import predict

    pred = root / "predictions.csv"
    stamp = {"input": _file_hash(predict_input), "student": weights_hash(student_dir)}
    if label_format != "index":  # the default leaves stamps written before the option as they were
        stamp["labels"] = label_format
    stamp_path = root / "predictions.json"
    try:
        old = read_json(stamp_path) if stamp_path.exists() else None
    except UserError:  # a damaged stamp: predict again
        old = None
    if pred.exists() and old == stamp:
        log(f"[predict] done already: {pred}")
        return "skipped"
    predict(student_dir, predict_input, pred, label_format=label_format, log=log)
    atomic.write_json(stamp_path, stamp)
    return "written"


def run_pipeline(config_path, overrides=(), out=None, data=None, predict_input=None, log=print,
                 predict_labels="index") -> dict:
    raw = read_yaml(config_path)
    if "teacher" not in raw and not any(o.startswith("teacher.") for o in overrides):
        log(f"{config_path}: no teacher: section, so the teacher (a full fine-tune) trains with the student's train "
            "keys; a teacher: section sets its own (the teacher presets: lr 2e-5, batch 16, 2 epochs)")
    teacher_cfg, student_cfg = split_configs(raw, overrides, data)
    if predict_input:  # a bad input file fails now, not after the teacher and the student have trained
        from .predict import check_label_format, read_input

        check_label_format(predict_labels, "--predict-labels")
        read_input(predict_input)
    # text labels: both stages take the data's classes now, as train would, so their configs match their runs'
    from .data import with_label_names

    teacher_cfg, student_cfg = with_label_names(teacher_cfg, log), with_label_names(student_cfg, lambda *a: None)
    root = Path(out or Path("runs") / student_cfg.name).absolute()  # the student's config names its teacher by it
    teacher_dir, student_dir = root / "teacher", root / "student"
    rounds = [[root / name for name in names] for names in teacher_names(student_cfg)]
    teachers = tuple(student_cfg.distill.teachers) + tuple(str(d) for d in rounds[-1])
    student_cfg = config_lib.override(student_cfg, **{"distill.teachers": list(teachers)})
    if student_cfg.distill.weights and len(student_cfg.distill.weights) != len(teachers):
        raise UserError("distill.weights: give one weight per teacher, the pipeline's own teachers last")
    stages, t0 = {}, time.time()
    previous = []
    for folders in rounds:
        for member, folder in enumerate(folders):
            cfg = round_config(teacher_cfg, student_cfg, member, previous)
            stages[folder.name] = _train_stage(folder.name, cfg, folder, log)
        previous = folders

    # Teacher logits over the student's rows (transfer rows too): computed once into each teacher's cache,
    # which the student's training reads.
    from .data import load_splits
    from .distill import student_rows
    from .backbones import load_tokenizer
    from .graphs import pick_device

    student_rows(student_cfg, load_splits(student_cfg.data, student_cfg.train.seed),
                 pick_device(student_cfg.train.device), log, load_tokenizer(student_cfg.model.backbone))
    stages["logits"] = "cached"
    stages["student"] = _train_stage("student", student_cfg, student_dir, log)

    summary = {"teacher": str(teacher_dir), "student": str(student_dir), "stages": stages,
               "teachers": [[str(d) for d in folders] for folders in rounds]}
    for which, d in (("teacher", teacher_dir), ("student", student_dir)):
        summary[f"{which}_summary"] = read_json(d / "run.json").get("summary")
    if len(rounds) > 1 or len(rounds[0]) > 1:
        summary["teacher_summaries"] = {d.name: read_json(d / "run.json").get("summary") for f in rounds for d in f}
    if predict_input:
        stages["predict"] = _predict_stage(root, student_dir, predict_input, predict_labels, log)
        summary["predictions"] = str(root / "predictions.csv")
    summary["wall_s"] = round(time.time() - t0, 2)
    atomic.write_json(root / "pipeline.json", summary)
    log(f"pipeline folder: {root}")
    return summary


from .package import callable_module  # noqa: E402

callable_module(__name__)  # lorakd.pipeline(...) runs the API call lorakd.api.pipeline (lorakd/package.py)
