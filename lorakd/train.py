"""Train: the loop, its one-screen step, checkpoints and exact resume.

`train()` is the loop; `setup()` builds what it runs on (data, model, optimizer, step); `TrainState` is the
resumable state with its save/load. The step's CUDA-graph replay is in graphed_step.py; run.json, metrics.jsonl
and the progress bar in runfiles.py."""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from . import atomic, backbones, dist
from . import budget as budget_lib
from . import config as config_lib
from . import data as data_lib
from . import distill
from . import graphs
from . import model as model_lib
from .errors import UserError, first_line
from .evaluate import autocast, format_table, logits_for, metrics, progress_bar
from .graphed_step import GraphedStep, graphed
from .runfiles import Phases, RunLog, mark_failed, open_run_folder, update_info
from .runs import load_run, read_metrics


# ---------------------------------------------------------------- the step

@dataclass(eq=False)
class Step:
    """The training step on a batch given by indices into the token store. No host syncs inside, so a whole
    step can be replayed as a CUDA graph; the loss parts add into `acc` on the device. `share` (a device scalar) is
    this batch's part of the optimizer step's rows times the process count: shards of uneven size, and
    micro-batches of unequal size, then still average to the mean gradient over the step's rows. Its buffers
    (one flat gradient, `acc`, `share`) are made here."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list  # the trainable parameters, in the optimizer's order
    store: data_lib.TokenStore  # the train rows, on the device
    teacher_probs: torch.Tensor | None  # soft targets per train row; None: plain CE
    cfg: config_lib.Config
    amp: torch.dtype | None
    world: int

    def __post_init__(self):
        device = self.store.ids.device
        self.flat_grad = flat_gradients(self.params, device)
        self.acc, self.share = torch.zeros(3, device=device), torch.ones((), device=device)
        self.ready_mask = graphs.needs_ready_mask(self.model)

    def __call__(self, idx, width):
        """One batch, one optimizer step: what GraphedStep captures."""
        self.flat_grad.zero_()
        self.add_gradients(idx, width)
        self.update()

    def accumulate(self, micro_batches):
        """One optimizer step over micro-batches [(idx, width, share)] (train.grad_accum): their gradients add
        up, each weighted by its part of the step's rows, before one update. Always eager (setup says why)."""
        self.flat_grad.zero_()
        for idx, width, share in micro_batches:
            self.share.fill_(share)
            self.add_gradients(idx, width)
        self.update()

    def add_gradients(self, idx, width):
        ids, mask = self.store.batch(idx, width)
        if self.ready_mask:
            mask = graphs.additive_mask(mask)
        with autocast(ids.device, self.amp):
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        dc = self.cfg.distill
        soft = None if self.teacher_probs is None else self.teacher_probs[idx]
        loss, ce, kd = distill.student_loss(logits, self.store.labels[idx], soft, dc.alpha, dc.temperature)
        weighted = self.world > 1 or self.cfg.train.grad_accum > 1
        (loss * self.share if weighted else loss).backward()
        parts = torch.stack([loss.detach(), ce.detach(), kd.detach()])
        self.acc.add_(parts * self.share if weighted else parts)  # weighted like the gradient: the step's mean

    def update(self):
        if self.world > 1:  # data parallel: average gradients over processes (torch.distributed, NCCL or gloo)
            torch.distributed.all_reduce(self.flat_grad)
            self.flat_grad.div_(self.world)
        if self.cfg.train.grad_clip:  # foreach over the gradients (views of the flat buffer), no host sync
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip, foreach=True)
        self.optimizer.step()


# ---------------------------------------------------------------- optimizer and schedule

def make_optimizer(model, cfg, device):
    """AdamW, decay on weights but not biases or LayerNorm (as transformers.Trainer); on a GPU fused and
    capturable, with the lr in a device tensor so the schedule can change it between graph replays."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in named if n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n]
    decay = [p for n, p in named if all(p is not q for q in no_decay)]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if device.type != "cuda":
        return torch.optim.AdamW(groups, lr=cfg.train.lr), [p for _, p in named]
    for g in groups:  # the schedule's base lr stays a number: it computes each lr on the host, then fills the
        g.update(lr=torch.tensor(cfg.train.lr, device=device), initial_lr=cfg.train.lr)  # tensor in place
    opt = torch.optim.AdamW(groups, lr=cfg.train.lr, fused=True, capturable=True)
    return opt, [p for _, p in named]


def make_scheduler(optimizer, cfg, total: int, warmup: int):
    """transformers' schedule (train.schedule, each after a linear warm-up) over `total` optimizer steps."""
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(cfg.train.schedule, cfg.train.schedule)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def flat_gradients(params, device):
    """One buffer holding every gradient (params' .grad are views into it): one all-reduce."""
    flat = torch.zeros(sum(p.numel() for p in params), device=device)
    offset = 0
    for p in params:
        p.grad = flat[offset: offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


# ---------------------------------------------------------------- resumable state

@dataclass
class TrainState:
    """Everything a killed run needs to continue exactly where it was, beside the weights, optimizer and
    schedule. `step` counts optimizer steps (each of train.grad_accum micro-batches)."""
    step: int = 0
    acc_steps: int = 0  # steps summed into the loss accumulator since the last train-loss record
    train_time: float = 0.0
    samples: int = 0
    best: dict = field(default_factory=lambda: {"accuracy": -1.0, "step": 0})
    best_state: list | None = None  # the trainable weights at the best validation accuracy (CPU)
    best_metrics: dict | None = None  # their validation metrics: the run's result, not evaluated again
    stale_evals: int = 0  # evaluations since the best one (train.early_stop_patience)

    def save(self, path, params, optimizer, scheduler, acc, device):
        atomic.torch_save(path, {
            "step": self.step, "acc_steps": self.acc_steps, "acc": acc.cpu(), "train_time": self.train_time,
            "samples": self.samples, "best": self.best, "best_state": self.best_state,
            "best_metrics": self.best_metrics, "stale_evals": self.stale_evals,
            "trainable": [p.detach().cpu() for p in params], "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}})

    @classmethod
    def load(cls, path, params, optimizer, scheduler, acc, device) -> "TrainState":
        saved = torch.load(path, map_location="cpu", weights_only=True)  # tensors, numbers, dicts: no code
        with torch.no_grad():
            for p, v in zip(params, saved["trainable"]):
                p.copy_(v)
        lrs = [g["lr"] for g in optimizer.param_groups]
        optimizer.load_state_dict(saved["optimizer"])
        for g, lr in zip(optimizer.param_groups, lrs):
            if torch.is_tensor(lr):  # the device lr tensor the captured graphs read stays, with the saved value
                g["lr"] = lr.copy_(g["lr"])
        if "scheduler" in saved:
            scheduler.load_state_dict(saved["scheduler"])
        else:  # a checkpoint from before the schedule was saved in it: the schedule's place is the step
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "scheduler stepped before the optimizer": on purpose
                for _ in range(saved["step"]):
                    scheduler.step()
        acc.copy_(saved["acc"])
        torch.set_rng_state(saved["rng"]["torch"])
        if device.type == "cuda" and saved["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(saved["rng"]["cuda"], device)
        return cls(saved["step"], saved["acc_steps"], saved["train_time"], saved["samples"], saved["best"],
                   saved["best_state"], saved.get("best_metrics"), saved.get("stale_evals", 0))


# ---------------------------------------------------------------- the run log

class StopOnSignal:
    """SIGTERM (a scheduler's or the GPU's owner's) or Ctrl-C (SIGINT) is noted; the loop ends its step,
    checkpoints, says how to resume and exits: 143 for SIGTERM, a KeyboardInterrupt for Ctrl-C (the cli's exit
    130). A second Ctrl-C interrupts at once; a SIGINT the process was started to ignore stays ignored."""

    def __init__(self, active):
        self.active, self.signal, self.old = active, None, {}

    def __enter__(self):
        if self.active:
            self.old[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._note)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self.old[signal.SIGINT] = signal.signal(signal.SIGINT, self._note)
        return self

    def _note(self, signum, frame):
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user will not wait for the checkpoint
        self.signal = signum

    def exit(self):
        if self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        sys.exit(143)

    def __exit__(self, *exc):
        for signum, old in self.old.items():
            signal.signal(signum, old)


# ---------------------------------------------------------------- wall-clock phases

# ---------------------------------------------------------------- set-up

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
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    multiple = data_lib.pad_multiple(cfg.data.pad_multiple, cfg.data.max_length, device.type, tc.batch_size)
    stores = {name: data_lib.TokenStore(data_lib.encode(tok, s.texts, cfg.data.max_length), s.labels, pad_id, device,
                                        multiple)
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
        raise UserError(f"{run_dir}: a run already exists here; use --resume {run_dir} or another --out")
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


def epoch_batches(run, epoch):
    """The epoch's optimizer steps, each a list of train.grad_accum micro-batches (fewer at the epoch's end):
    the global batches and this process's shards of them, the shards already on the device."""
    tc, store = run.cfg.train, run.stores["train"]
    batches = data_lib.batch_order(store.lengths_np, tc.batch_size, tc.seed, epoch, run.cfg.data.group_by_length)
    batches = [b for b in batches if len(b) >= run.world]
    shards = [b[run.rank::run.world] for b in batches]
    starts = np.cumsum([0] + [len(b) for b in shards])
    on_device = torch.as_tensor(np.concatenate(shards), device=run.device)  # one copy per epoch, none per step
    micro = [(on_device[starts[i]: starts[i + 1]], b) for i, b in enumerate(batches)]
    return [micro[i: i + tc.grad_accum] for i in range(0, len(micro), tc.grad_accum)]


def take_step(run, micro_batches):
    """One optimizer step: one batch (replayed as a CUDA graph where one was captured), or the train.grad_accum
    micro-batches of one update."""
    store = run.stores["train"]
    if run.cfg.train.grad_accum > 1:
        n = sum(len(rows) for _, rows in micro_batches)
        return run.step.accumulate([(idx, store.width(rows), len(idx) * run.world / n) for idx, rows in micro_batches])
    (idx, rows), = micro_batches
    if run.world > 1:
        run.share.fill_(len(idx) * run.world / len(rows))
    width = store.width(rows)  # the global batch's: every process has the same shape
    if isinstance(run.step, GraphedStep):
        run.step(idx, width, (len(rows), width))  # keyed by the global batch's shape: all processes capture together
    else:
        run.step(idx, width)


# ---------------------------------------------------------------- the loop

def train(cfg, run_dir, resume=False, log=print, plots=False) -> dict:
    """Train one run into run_dir; returns its summary (also in run.json). plots: also draw plots/*.png
    (rank 0), timed with the other phases in summary["phases_s"]."""
    phases = Phases()
    run_dir, log = Path(run_dir), clear_bars_for(log)
    if resume:
        _, info = load_run(run_dir)  # refuses a missing, foreign or newer-format folder
        if info.get("status") == "done":
            log(f"{run_dir}: already finished")
            return info["summary"]
    run = setup(cfg, run_dir, resume, log, phases)
    try:
        return _train_loop(run, plots)
    except Exception as e:  # a diverged or crashed run says so in run.json; a killed one still says running
        if run.rank == 0:
            mark_failed(run_dir, e)
        raise


def clear_bars_for(log):
    """`log` that first takes any progress bar off the terminal (and puts it back after): a line never
    continues a bar's line."""
    from tqdm import tqdm

    def write(*args, **kwargs):
        with tqdm.external_write_mode():
            log(*args, **kwargs)

    return write


def _train_loop(run, plots) -> dict:
    cfg, run_dir, phases = run.cfg, run.run_dir, run.phases
    tc, st = cfg.train, run.state
    runlog = RunLog(run_dir, run.rank, run.world, run.total, st.step, run.steps_per_epoch, run.with_kd, tc.tensorboard)
    if plots and run.rank == 0:  # matplotlib imports while the GPU trains (the host mostly waits), not after
        threading.Thread(target=_import_plotting, daemon=True).start()
    batches, batches_epoch = None, None
    with StopOnSignal(run.rank == 0 or run.world == 1) as stop:
        try:
            while st.step < run.total:
                epoch, pos = divmod(st.step, run.steps_per_epoch)
                if batches_epoch != epoch:
                    batches, batches_epoch = epoch_batches(run, epoch), epoch
                lr = run.scheduler.get_last_lr()[0]  # this step's: the schedule moves on after it
                t0 = time.perf_counter()
                take_step(run, batches[pos])
                st.step, st.acc_steps = st.step + 1, st.acc_steps + 1
                st.samples += sum(len(rows) for _, rows in batches[pos])
                last = st.step == run.total
                if not last:  # past the last step there is no lr to set (polynomial's would divide by zero)
                    run.scheduler.step()
                log_now, eval_now = last or st.step % tc.log_every == 0, last or st.step % run.eval_every == 0
                if run.device.type == "cuda" and (log_now or eval_now):
                    torch.cuda.synchronize(run.device)  # time only where we would sync anyway
                st.train_time += time.perf_counter() - t0
                runlog.bar.update(1)
                if log_now:
                    runlog.train_loss(st, run.acc, lr, run.ckpt_path)
                if eval_now:
                    phases.mark("train_loop")
                    evaluate_and_keep_best(run, runlog)
                    if should_stop_early(run) and not last:
                        break
                if (tc.checkpoint_every and st.step % tc.checkpoint_every == 0) or stop.signal:
                    phases.mark("train_loop")
                    save_checkpoint(run, runlog, lr)
                    phases.mark("checkpoints")
                if stop.signal:
                    run.log(f"stopped by signal at step {st.step}; continue with: lorakd train --resume {run_dir}")
                    stop.exit()
        finally:
            runlog.close()
    phases.mark("train_loop")
    return finish(run, plots)


def should_stop_early(run) -> bool:
    """train.early_stop_patience evaluations in a row without a better validation accuracy: stop (the best
    weights are the run's result, as always)."""
    st, patience = run.state, run.cfg.train.early_stop_patience
    if not patience or st.stale_evals < patience:
        return False
    run.log(f"early stop at step {st.step}: validation accuracy has not improved on {st.best['accuracy']:.4f} "
            f"(step {st.best['step']}) in {patience} evaluations")
    return True


def _import_plotting():
    try:
        from .report import import_plotting
        import_plotting()
    except Exception:  # noqa: BLE001  plot_run imports again and reports a real failure
        pass


def evaluate_and_keep_best(run, runlog):
    """Validation metrics into the log; the best weights so far kept in memory and saved as the adapter."""
    if "validation" not in run.stores:
        return
    st, store = run.state, run.stores["validation"]
    rows = dist.shard(len(store), run.rank, run.world)
    with progress_bar(len(rows), "validation") as bar:
        logits = logits_for(run.model, store, run.cfg.train.eval_batch_size, run.amp, rows, bar)
    logits = dist.gather_rows(logits, rows, len(store), run.world, run.device)
    m = metrics(logits, run.splits["validation"].labels, run.cfg.data.label_names)
    run.phases.mark("eval")
    runlog.record({"step": st.step, "epoch": round(st.step / run.steps_per_epoch, 4), "split": "validation",
                   "loss": m["loss"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]})
    run.log(f"step {st.step}/{run.total}  validation accuracy {m['accuracy']:.4f}  loss {m['loss']:.4f}")
    st.stale_evals += 1
    if m["accuracy"] > st.best["accuracy"]:
        st.best, st.stale_evals = {"accuracy": m["accuracy"], "step": st.step}, 0
        st.best_state = [p.detach().to("cpu", copy=True) for p in run.params]
        st.best_metrics = m
        save_weights(run)
    run.phases.mark("files")


def save_weights(run):
    if run.rank == 0:
        full = run.cfg.model.full_finetune
        model_lib.save_trained(run.model, run.run_dir / ("model" if full else "adapter"), full)


def save_checkpoint(run, runlog, lr):
    if not torch.isfinite(run.acc).all():  # never checkpoint a diverged model: the log check names the step
        runlog.train_loss(run.state, run.acc, lr, run.ckpt_path)
    if run.rank == 0:
        run.state.save(run.ckpt_path, run.params, run.optimizer, run.scheduler, run.acc, run.device)


def finish(run, plots=False) -> dict:
    """The best weights back in the model, final evaluation, eval.json, plots, and the run marked done."""
    st, cfg, phases = run.state, run.cfg, run.phases
    if st.best_state is not None:  # the best checkpoint by validation accuracy is the run's result
        with torch.no_grad():
            for p, v in zip(run.params, st.best_state):
                p.copy_(v.to(run.device))
    else:
        save_weights(run)
    phases.mark("files")
    results = {"validation": st.best_metrics} if st.best_metrics else {}  # the best weights' own evaluation
    for name in ("validation", "test"):
        if name in run.stores and name not in results and run.rank == 0:
            with progress_bar(len(run.stores[name]), name) as bar:
                logits = logits_for(run.model, run.stores[name], cfg.train.eval_batch_size, run.amp, bar=bar)
            results[name] = metrics(logits, run.splits[name].labels, cfg.data.label_names)
    for name, m in results.items():
        run.log(format_table(name, m))
    phases.mark("eval")
    summary = {"best_step": st.best["step"], "steps": st.step, "stopped_early": st.step < run.total,
               "train_time_s": round(st.train_time, 3),
               "samples_per_s": st.samples / max(st.train_time, 1e-9),
               "graph_capture_s": round(getattr(run.step, "capture_s", 0.0), 3),  # this process's, since (re)start
               "cuda_graphs": len(getattr(run.step, "graphs", {})), "trainable": run.counts["trainable"],
               "total": run.counts["total"], "world_size": run.world,
               "device": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu"}
    if run.device.type == "cuda":  # the process's high-water mark: token ids, teacher targets, model, activations
        summary["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 3)
    for name, m in results.items():
        summary[f"{name}_accuracy"] = m["accuracy"]
    if run.rank == 0:
        atomic.write_json(run.run_dir / "eval.json", results)
        phases.mark("files")
        if plots:  # a plot is a view of the run, not its result: one that fails leaves the run done
            from .report import plot_run

            try:
                plot_run(run.run_dir)
            except Exception as e:  # noqa: BLE001
                why = first_line(e)
                run.log(f"plots: not drawn ({type(e).__name__}: {why}); the run is done")
            phases.mark("plots")
        # graph_capture is part of train_loop, so not in the total
        summary["phases_s"] = {**phases.rounded(), "graph_capture": summary["graph_capture_s"], "total": phases.total()}
        update_info(run.run_dir, status="done", summary=summary)
        run.ckpt_path.unlink(missing_ok=True)
        if run.ckpt_path.parent.is_dir() and not any(run.ckpt_path.parent.iterdir()):
            run.ckpt_path.parent.rmdir()  # a finished run keeps no empty checkpoint/ folder
    dist.barrier(run.world)
    return summary


from . import callable_module  # noqa: E402

callable_module(__name__)  # lorakd.train(...) runs the API call lorakd.api.train (lorakd/__init__.py)
