"""Setup: what a run trains on, built once before the loop: processes and device, the checks, the model and its
budget, the data and the teachers' soft targets, the run folder, the optimizer and the (graphed) step."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import torch

from . import atomic, backbones, dist
from . import budget as budget_lib
from . import data as data_lib
from . import distill
from . import graphs
from . import model as model_lib
from .errors import UserError
from .graphed_step import graphed
from .runfiles import Phases, open_run_folder
from .runs import read_metrics
from .step import Step, TrainState, make_optimizer, make_scheduler
from .trust import read_json


# ---------------------------------------------------------------- the step


def warm_spec(cfg, device, world):
    """What train.prewarm warms on a GPU while the imports run (graphs.start_device): the backbone's widths,
    this process's batch (at most 64 rows), each padded width the length buckets can give (at most 8, the widest
    first), and the run's precision."""
    if not cfg.train.prewarm or device.type != "cuda" or torch.cuda.is_initialized():
        return None  # a process that has run on its GPU before (a pipeline's student, a sweep's next run) is warm
    dims = graphs.warm_dims(cfg.model.backbone)
    dc = cfg.data
    multiple = data_lib.pad_multiple(dc.pad_multiple, dc.max_length, device.type, cfg.train.batch_size)
    widths = sorted({data_lib.pad_length(n, multiple, dc.max_length) for n in range(1, dc.max_length + 1)}, reverse=True)
    bf16 = graphs.amp_dtype(cfg.train.precision, device) is not None
    return dims and (dims, max(1, min(64, cfg.train.batch_size // world)), widths[:8], bf16)


def setup(cfg, run_dir: Path, resume: bool, log, phases=None):
    """Everything the loop runs on: processes, run folder, data, model, optimizer, the step, resumed state."""
    phases = phases or Phases()
    rank, world, local_rank = dist.env()
    device = graphs.pick_device(cfg.train.device, local_rank)
    context = graphs.start_device(device, warm_spec(cfg, device, world))  # overlaps the imports and build below
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init(device, world)
    if rank != 0:
        log = lambda *a, **k: None  # noqa: E731  only rank 0 talks and writes
    if not resume:  # text labels and no data.label_names: the classes from the data, kept in config.yaml
        cfg = data_lib.with_label_names(cfg, log)
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    check_setting(cfg, run_dir, resume, device, world)
    phases.mark("setup")

    torch.manual_seed(tc.seed)
    model = model_lib.build(cfg.model, len(cfg.data.label_names))  # the same initial weights on every process
    counts = budget_lib.summarize_params(model)  # what count_params gives without weights, from the model itself
    budget_lib.check_budget(cfg, counts)
    phases.mark("build")
    splits, stores, teacher_probs, hf_config = setup_data(cfg, device, log)
    phases.mark("data")
    dist.barrier(world)  # every process has checked the folder before rank 0 writes to it
    if rank == 0:
        open_run_folder(cfg, run_dir, resume, counts, backbones.backbone_fingerprint(hf_config))
    log(f"run folder: {run_dir}")
    if world > 1:  # what each process runs: small shards make latency-bound steps (README: when it pays)
        log(f"data parallel: {world} processes ({device.type}), {tc.batch_size // world} rows each of every "
            f"global batch of {tc.batch_size}")
    log(f"trainable parameters: {counts['trainable']:,} of {counts['total']:,}"
        + (f" (budget {cfg.model.budget:,})" if budget_lib.budget_applies(cfg) else ""))

    torch.manual_seed(tc.seed + rank)  # dropout masks differ across processes
    amp = graphs.amp_dtype(tc.precision, device)
    if amp is not None:
        graphs.freeze_to(model, amp)
    if context is not None:
        context.stop.set()  # a warm-up still running ends after its current shape
        context.join()
    model.to(device).train()
    if tc.compile:
        # inductor fuses the elementwise kernels around the matmuls. Each padded width compiles once (shapes
        # become dynamic after the second), in the warm-up steps before a CUDA graph captures it: compiling is
        # seconds per shape, so it only pays on long runs. Off by default (README: levers).
        model.compile()
    run = SimpleNamespace(
        phases=phases, cfg=cfg, run_dir=run_dir, ckpt_path=run_dir / "checkpoint" / "state.pt", rank=rank,
        world=world, device=device, log=log, amp=amp, splits=splits, stores=stores, counts=counts, model=model,
        with_kd=teacher_probs is not None)
    setup_step(run, teacher_probs, resume)
    phases.mark("device")
    return run


def setup_data(cfg, device, log):
    """(splits, their token stores on the device, the teachers' soft targets or None, the backbone's config)."""
    tc = cfg.train
    splits = data_lib.load_splits(cfg.data, tc.seed)
    tok = backbones.load_tokenizer(cfg.model.backbone)
    hf_config = backbones.backbone_config(cfg.model.backbone, len(cfg.data.label_names))  # what load_run checks
    limit = backbones.max_tokens(tok, hf_config)
    if limit and cfg.data.max_length > limit:  # longer inputs would fail inside the model's position table
        raise UserError(f"data.max_length {cfg.data.max_length}: {cfg.model.backbone} takes at most {limit} tokens")
    train_rows, teacher_probs = distill.student_rows(cfg, splits, device, log, tok)
    splits["train"] = train_rows
    multiple = data_lib.pad_multiple(cfg.data.pad_multiple, cfg.data.max_length, device.type, tc.batch_size)
    stores = {name: data_lib.TokenStore(data_lib.encode(tok, s.texts, cfg.data.max_length), s.labels,
                                        data_lib.pad_id(tok), device, multiple)
              for name, s in splits.items() if len(s) and name != "unlabelled"}
    if tc.early_stop_patience and "validation" not in stores:
        raise UserError("train.early_stop_patience: early stopping needs a validation split (data.val_fraction > 0)")
    return splits, stores, teacher_probs, hf_config


def check_setting(cfg, run_dir, resume, device, world):
    """Refuse what cannot run here before anything is built: one line naming the setting or folder."""
    tc = cfg.train
    if tc.batch_size % world:
        raise UserError(f"train.batch_size {tc.batch_size} does not split over {world} processes")
    if tc.cuda_graphs == "on" and device.type != "cuda":
        raise UserError("train.cuda_graphs=on needs a CUDA device")
    if tc.cuda_graphs == "on" and tc.grad_accum > 1:
        raise UserError("train.cuda_graphs=on: train.grad_accum > 1 runs the plain step; use train.cuda_graphs=auto")
    checkpoint = run_dir / "checkpoint"
    if resume and os.path.lexists(checkpoint):  # a planted link: resume would write and delete through it
        atomic.folder(checkpoint)
    if not resume and (run_dir / "run.json").exists():
        try:
            done = read_json(run_dir / "run.json").get("status") == "done"
        except (UserError, OSError):  # a damaged run.json: the message below still holds
            done = False
        raise UserError(f"{run_dir}: a run already exists here" + (", finished; give another --out" if done else
                                                                  f"; use --resume {run_dir} or another --out"))
    if not resume and run_dir.is_dir() and any(p.name != ".lock" for p in run_dir.iterdir()):
        raise UserError(f"{run_dir}: a folder with other files in it; give a new or empty folder (--out)")


def setup_step(run, teacher_probs, resume):
    """Onto `run`: the optimizer and its schedule, the step (replayed as CUDA graphs where it can be), the
    number of optimizer steps, and the state a resumed run continues from."""
    cfg, tc, device, log = run.cfg, run.cfg.train, run.device, run.log
    optimizer, params = make_optimizer(run.model, cfg, device)
    if run.world > 1:
        torch.distributed.all_reduce(torch.zeros(1, device=device))  # communicator up before any capture
    step = Step(model=run.model, optimizer=optimizer, params=params, store=run.stores["train"],
                teacher_probs=teacher_probs, cfg=cfg, amp=run.amp, world=run.world)
    run.acc, run.share = step.acc, step.share
    step = graphed(step, tc, device, log)
    # A last batch smaller than the process count would leave a process idle: it is dropped.
    full, rest = divmod(len(run.stores["train"]), tc.batch_size)
    run.steps_per_epoch = math.ceil((full + (rest >= run.world)) / tc.grad_accum)  # optimizer steps
    run.total = tc.max_steps or math.ceil(tc.epochs * run.steps_per_epoch)
    run.eval_every = tc.eval_every or run.steps_per_epoch
    scheduler = make_scheduler(optimizer, cfg, run.total, math.ceil(tc.warmup_ratio * run.total))
    state = TrainState()
    if resume and run.ckpt_path.exists():
        state = TrainState.load(run.ckpt_path, params, optimizer, scheduler, step.acc, device)
        log(f"resumed at step {state.step} of {run.total}")
    if run.rank == 0:  # records after the checkpoint are replayed by the resumed run: drop them
        kept = [r for r in read_metrics(run.run_dir) if resume and r["step"] <= state.step]
        atomic.write_text(run.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
    run.optimizer, run.params, run.scheduler, run.step, run.state = optimizer, params, scheduler, step, state
