"""The reference design's own way of distilling, timed command to exit: a stock transformers.Trainer full fine-tune
of the teacher, then a Trainer subclass whose loss runs the teacher forward on every student batch (no cached
logits), with a PEFT LoRA student. Issue 30's peer for `lorakd pipeline`.

    python bench/trainer_way.py --teacher-backbone DIR --student-backbone DIR --data DIR --labelled 8791
        [--config pipeline-mpnet] [--seed 42] [--out bench/results] [--max-steps N] [--deadline-s S] [key=value ...]

The recipe (teacher and student lr, batch, epochs, LoRA shape, distill alpha and T, distill.augment) is read from
the same pipeline preset lorakd runs, and the rows come from lorakd's own reader: the same train/validation carve,
the same labelled rows and the same transfer rows (the train rows data.labelled leaves out, plus the preset's
augmented copies) as `lorakd pipeline --config PRESET data.labelled=N train.seed=SEED`. --labelled 0: all labels.
--max-steps N caps each Trainer below its recipe's steps (a CPU smoke test, a time-limited GPU call), and
--deadline-s S stops whichever phase is training once the command has run S seconds (then it evaluates and writes
the JSON); a capped run's JSON holds each phase's samples/s and `extrapolated_full_s`: the wall time with every
capped phase's missing steps added at the steady per-step time of its second half.
Writes OUT/trainer-way-labelled<N>.json (N = 0: all labels).
"""
from __future__ import annotations

import time

T0 = time.time()  # command start, before the heavy imports: what a user's clock sees

import inspect  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")  # one GPU: Trainer would spread over all of them (DataParallel)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,  # noqa: E402
                          Trainer, TrainerCallback, TrainingArguments)

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]
from lorakd import config as config_lib  # noqa: E402
from lorakd import data as data_lib  # noqa: E402
from lorakd import distill  # noqa: E402
from lorakd import backbones  # noqa: E402
from lorakd.errors import UserError  # noqa: E402
from lorakd.pipeline import split_configs  # noqa: E402
from lorakd.yaml_files import preset_path, read_yaml  # noqa: E402
from pipeline_way import comparison_parser, regime  # noqa: E402
from result_files import result_paths, write_result  # noqa: E402

GPU = torch.cuda.is_available()


class Clock:
    """Seconds per phase, back to back from T0, so the phases add up to the wall time."""

    def __init__(self):
        self.phases, self.last = {}, T0

    def lap(self, name):
        now = time.time()
        self.phases[name] = round(now - self.last, 2)
        self.last = now


def peak_gb():
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if GPU else 0.0


def records(tok, texts, labels, max_length, prefix=""):
    """Tokenised rows, unpadded (the collator pads each batch): {prefix}input_ids, {prefix}attention_mask."""
    enc = tok(texts, truncation=True, max_length=max_length)
    rows = [{f"{prefix}input_ids": i, f"{prefix}attention_mask": m}
            for i, m in zip(enc["input_ids"], enc["attention_mask"])]
    if labels is not None:
        for r, y in zip(rows, labels):
            r["labels"] = int(y)
    return rows


class PairCollator:
    """Pads the student's ids and, where a row has them, the teacher's (its own vocabulary and pad id)."""

    def __init__(self, student_tok, teacher_tok):
        self.student, self.teacher = DataCollatorWithPadding(student_tok), DataCollatorWithPadding(teacher_tok)

    def __call__(self, rows):
        batch = self.student([{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows])
        if "teacher_input_ids" in rows[0]:
            t = self.teacher([{"input_ids": r["teacher_input_ids"], "attention_mask": r["teacher_attention_mask"]}
                              for r in rows])
            batch["teacher_input_ids"], batch["teacher_attention_mask"] = t["input_ids"], t["attention_mask"]
        return batch


class DistillTrainer(Trainer):
    """The student's Trainer: each training batch runs the frozen teacher forward, and the loss is lorakd's own
    (distill.student_loss: alpha * CE + (1 - alpha) * T^2 * KL on labelled rows, the KD term alone on transfer
    rows, label -1), so both arms optimise the same objective. Batches without teacher ids (evaluation): CE."""

    def __init__(self, *args, teacher, alpha, temperature, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().to(self.args.device)
        self.alpha, self.temperature = alpha, temperature

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        labels = inputs.pop("labels")
        t_ids, t_mask = inputs.pop("teacher_input_ids", None), inputs.pop("teacher_attention_mask", None)
        outputs = model(**inputs)
        logits = outputs.logits.float()
        probs = None
        if t_ids is not None:
            # the teacher outside accelerate's autocast: bf16 as the student's forward is, no graph kept
            with torch.no_grad(), torch.autocast(self.args.device.type, torch.bfloat16, enabled=self.args.bf16):
                t_logits = self.teacher(input_ids=t_ids, attention_mask=t_mask).logits.float()
            probs = F.softmax(t_logits / self.temperature, dim=-1)
        loss, _, _ = distill.student_loss(logits, labels, probs, self.alpha, self.temperature)
        return (loss, outputs) if return_outputs else loss


def recipe_steps(n_rows, t) -> int:
    return math.ceil(t.epochs * math.ceil(n_rows / t.batch_size))


def training_args(t, out_dir, seed, max_steps, n_rows):
    """The run's TrainConfig as TrainingArguments: no checkpoints, no reporting, bf16 on GPU. A cap at or above
    the recipe's steps is no cap (Trainer's max_steps would replace the epochs and train longer)."""
    capped = 0 < max_steps < recipe_steps(n_rows, t)
    kwargs = dict(output_dir=str(out_dir), per_device_train_batch_size=t.batch_size,
                  per_device_eval_batch_size=t.eval_batch_size, learning_rate=t.lr, num_train_epochs=t.epochs,
                  max_steps=max_steps if capped else -1, weight_decay=t.weight_decay, lr_scheduler_type=t.schedule,
                  max_grad_norm=t.grad_clip, bf16=GPU, save_strategy="no", report_to=[], seed=seed,
                  logging_steps=200, disable_tqdm=True, remove_unused_columns=False, label_names=["labels"])
    # transformers 5 dropped warmup_ratio: a float warmup_steps is the ratio there.
    if "warmup_ratio" in inspect.signature(TrainingArguments).parameters:
        kwargs["warmup_ratio"] = t.warmup_ratio
    else:
        kwargs["warmup_steps"] = t.warmup_ratio
    return TrainingArguments(**kwargs)


class StepClock(TrainerCallback):
    """The time each optimizer step ends; stops training once the command has run deadline_s (0 = never),
    so a time-limited call still evaluates and writes its JSON."""

    def __init__(self, deadline_s):
        self.deadline_s, self.ends = deadline_s, []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.time())
        if self.deadline_s and self.ends[-1] - T0 > self.deadline_s:
            control.should_training_stop = True


def train_phase(trainer, clock, n_rows, t):
    """trainer.train(), timed: steps run, the steps a full run takes, samples/s, peak GPU memory, and the
    seconds a full run's phase would take (the steps not run at the steady per-step time of the second half)."""
    if GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    out = trainer.train()
    if GPU:
        torch.cuda.synchronize()
    train_s = time.time() - t0
    full_steps = recipe_steps(n_rows, t)
    half = clock.ends[len(clock.ends) // 2:]
    step_s = (half[-1] - half[0]) / (len(half) - 1) if len(half) > 1 else train_s / max(out.global_step, 1)
    return {"rows": n_rows, "steps": out.global_step, "full_steps": full_steps, "train_s": round(train_s, 2),
            "samples_per_s": round(out.global_step * t.batch_size / train_s, 1),
            "steady_samples_per_s": round(t.batch_size / step_s, 1), "peak_gb": peak_gb(),
            "full_train_s": round(train_s + max(full_steps - out.global_step, 0) * step_s, 2)}


def accuracy(trainer, rows, labels):
    pred = trainer.predict(rows)
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    return round(float((np.argmax(logits, -1) == labels).mean()), 4)


def load_configs(args):
    """(teacher config, student config, splits, transfer texts) as `lorakd pipeline` would have them."""
    overrides = [f"model.backbone={args.student_backbone}", f"teacher.model.backbone={args.teacher_backbone}",
                 f"data.labelled={args.labelled}", f"train.seed={args.seed}", *args.overrides]
    teacher_cfg, student_cfg = split_configs(read_yaml(preset_path(args.config)), overrides, args.data)
    splits = data_lib.load_splits(student_cfg.data, student_cfg.train.seed)
    # transfer_rows only asks whether a teacher exists; this script's teacher is trained below, not a run folder
    named = config_lib.override(student_cfg, **{"distill.teachers": ["trainer-way"]})
    student_tok = backbones.load_tokenizer(student_cfg.model.backbone)
    transfer = distill.transfer_rows(named, splits, student_tok, log=lambda *a: None)
    return teacher_cfg, student_cfg, splits, [] if transfer is None else transfer.texts


def run(args):
    clock = Clock()
    clock.lap("imports")
    teacher_cfg, student_cfg, splits, transfer = load_configs(args)
    train, val = splits["train"], splits["validation"]
    clock.lap("data")
    n = student_cfg.data.max_length
    t_src, s_src = (backbones.resolve_backbone(c.model.backbone) for c in (teacher_cfg, student_cfg))
    t_tok, s_tok = AutoTokenizer.from_pretrained(t_src), AutoTokenizer.from_pretrained(s_src)
    teacher_train, teacher_val = (records(t_tok, s.texts, s.labels, n) for s in (train, val))
    texts = train.texts + transfer
    labels = np.concatenate([train.labels, np.full(len(transfer), -1, dtype=np.int64)])
    student_train = records(s_tok, texts, labels, n)
    for r, tr in zip(student_train, records(t_tok, texts, None, n, prefix="teacher_")):
        r.update(tr)
    student_val = records(s_tok, val.texts, val.labels, n)
    clock.lap("tokenise")
    res = {"phases": {}}
    tmp = Path(tempfile.mkdtemp(prefix="trainer-way-"))  # Trainer wants an output_dir; nothing is saved there

    # ---- teacher: a stock Trainer, full fine-tune
    transformers.set_seed(args.seed)
    # .float(): transformers 5 loads a bf16 checkpoint (the GPU carry's) as bf16; Trainer's bf16 is autocast over
    # fp32 weights, as lorakd trains
    teacher = AutoModelForSequenceClassification.from_pretrained(t_src, num_labels=len(student_cfg.data.label_names))
    teacher = teacher.float()
    tt = teacher_cfg.train
    steps = StepClock(args.deadline_s)
    targs = training_args(tt, tmp / "teacher", args.seed, args.max_steps, len(teacher_train))
    trainer = Trainer(model=teacher, args=targs,
                      train_dataset=teacher_train, data_collator=DataCollatorWithPadding(t_tok), callbacks=[steps])
    res["phases"]["teacher_train"] = train_phase(trainer, steps, len(teacher_train), tt)
    clock.lap("teacher_train")
    res["teacher_acc"] = accuracy(trainer, teacher_val, val.labels)
    clock.lap("teacher_eval")
    teacher = trainer.model
    del trainer  # its optimizer state goes; the teacher stays for the student's batches
    if GPU:
        torch.cuda.empty_cache()

    # ---- student: PEFT LoRA, a Trainer subclass running the teacher on every batch
    transformers.set_seed(args.seed)
    m, st, dc = student_cfg.model, student_cfg.train, student_cfg.distill
    student = AutoModelForSequenceClassification.from_pretrained(s_src, num_labels=len(student_cfg.data.label_names))
    student = get_peft_model(student.float(), LoraConfig(task_type="SEQ_CLS", r=m.r, lora_alpha=m.alpha,
                                                 lora_dropout=m.dropout, target_modules=list(m.targets)))
    res["student_trainable"] = student.get_nb_trainable_parameters()[0]
    steps = StepClock(args.deadline_s)
    sargs = training_args(st, tmp / "student", args.seed, args.max_steps, len(student_train))
    trainer = DistillTrainer(model=student, args=sargs,
                             train_dataset=student_train, data_collator=PairCollator(s_tok, t_tok), callbacks=[steps],
                             teacher=teacher, alpha=dc.alpha, temperature=dc.temperature)
    res["phases"]["student_train"] = train_phase(trainer, steps, len(student_train), st)
    clock.lap("student_train")
    res["student_acc"] = accuracy(trainer, student_val, val.labels)
    clock.lap("student_eval")
    shutil.rmtree(tmp, ignore_errors=True)
    res["rows"] = {"labelled": len(train), "transfer": len(transfer), "validation": len(val)}
    res["recipe"] = {"teacher": config_lib.flatten(teacher_cfg), "student": config_lib.flatten(student_cfg)}
    return res, clock


def main(argv=None):
    p = comparison_parser(__doc__)
    p.add_argument("--max-steps", type=int, default=0, help="cap each Trainer's steps (0 = full epochs)")
    p.add_argument("--deadline-s", type=float, default=0, help="stop training once the command has run this long, "
                   "then evaluate and write the JSON (a call's time limit; 0 = none)")
    args = p.parse_args(argv)
    try:
        res, clock = run(args)
    except UserError as e:  # bad input: one line naming the file, row or option, as lorakd says it
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    wall = time.time() - T0
    phases = res.pop("phases")
    # each capped phase at its full steps; the rest of the command (imports, data, evaluation) already ran in full
    capped = any(ph["steps"] < ph["full_steps"] for ph in phases.values())
    extra = sum(ph["full_train_s"] - ph["train_s"] for ph in phases.values())
    out = {"regime": regime(args.labelled), "seed": args.seed,
           "config": args.config, "overrides": args.overrides, "wall_s": round(wall, 2),
           "phases_s": {**clock.phases, "total": round(wall, 2)}, "teacher_acc": res.pop("teacher_acc"),
           "student_acc": res.pop("student_acc"), "max_steps": args.max_steps, "deadline_s": args.deadline_s,
           "capped": capped, "extrapolated_full_s": round(wall + extra, 1) if capped else None,
           "train_phases": phases, "peak_gb": max(ph["peak_gb"] for ph in phases.values()), **res,
           "device": torch.cuda.get_device_name() if GPU else "cpu",
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}}
    name = f"trainer-way-labelled{args.labelled}"
    paths = result_paths(name, args.out, out["device"])  # the current file and a timestamped copy in scratch/
    write_result(paths, out)
    path = paths[0]
    print(f"\n{out['regime']}, seed {args.seed}, {out['device']}: wall {out['wall_s']} s"
          + (f" (capped; the full run about {out['extrapolated_full_s']} s)" if capped else ""))
    print("phase            seconds")
    for k, v in out["phases_s"].items():
        print(f"{k:<16} {v:>8}")
    print("train phase      rows     steps  full_steps  samples/s  steady/s  full_train_s  peak_gb")
    for k, ph in phases.items():
        print(f"{k:<16} {ph['rows']:<8} {ph['steps']:<6} {ph['full_steps']:<11} {ph['samples_per_s']:<10} "
              f"{ph['steady_samples_per_s']:<9} {ph['full_train_s']:<13} {ph['peak_gb']}")
    print(f"teacher_acc {out['teacher_acc']}  student_acc {out['student_acc']}  rows {out['rows']}  -> {path}")


if __name__ == "__main__":
    main()
