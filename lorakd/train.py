"""Train: the loop, checkpoints and exact resume.

`train()` is the loop; `train_setup.setup()` builds what it runs on (data, model, optimizer, step); the step and
`TrainState` (the resumable state) are in step.py, its CUDA-graph replay in graphed_step.py; run.json,
metrics.jsonl and the progress bar in runfiles.py."""
from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from . import atomic, dist
from . import data as data_lib
from . import model as model_lib
from .errors import first_line
from .evaluate import format_table, metrics
from .graphed_step import GraphedStep
from .inference import logits_for, progress_bar
from .runfiles import Phases, RunLog, mark_failed, update_info
from .runs import load_run
from .train_setup import setup


# ---------------------------------------------------------------- the step


# ---------------------------------------------------------------- optimizer and schedule


# ---------------------------------------------------------------- resumable state


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
    last_checkpoint = time.perf_counter()
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
                if checkpoint_due(run, log_now and not last, last_checkpoint) or stop.signal:
                    phases.mark("train_loop")
                    save_checkpoint(run, runlog, lr)
                    phases.mark("checkpoints")
                    last_checkpoint = time.perf_counter()
                if stop.signal:
                    run.log(f"stopped by signal at step {st.step}; continue with: lorakd train --resume {run_dir}")
                    stop.exit()
        finally:
            runlog.close()
    phases.mark("train_loop")
    return finish(run, plots)


def checkpoint_due(run, log_now, since) -> bool:
    """train.checkpoint_every steps, or train.checkpoint_minutes since the last checkpoint: the clock is read where
    the loss is logged (not at the last step: the run's files follow), and the processes agree (any one due), so
    that every rank checkpoints at the same step."""
    tc = run.cfg.train
    if tc.checkpoint_every and run.state.step % tc.checkpoint_every == 0:
        return True
    if not (tc.checkpoint_minutes and log_now):
        return False
    due = time.perf_counter() - since >= 60 * tc.checkpoint_minutes
    if run.world > 1:
        due = bool(dist.reduce_mean(torch.tensor(float(due), device=run.device), run.world) > 0)
    return due


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
        from .plots import import_plotting
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
            from .plots import plot_run

            try:
                plot_run(run.run_dir)
            except Exception as e:  # noqa: BLE001
                why = first_line(e)
                run.log(f"plots: not drawn ({type(e).__name__}: {why}); the run is done")
            phases.mark("plots")
        # graph_capture is part of train_loop, so not in the total
        summary["phases_s"] = {**phases.rounded(), "graph_capture": summary["graph_capture_s"], "total": phases.total()}
        update_info(run.run_dir, status="done", summary=summary)
        atomic.remove(run.ckpt_path)  # with any state.pt.*.tmp a kill mid-checkpoint left behind
        if run.ckpt_path.parent.is_dir() and not any(run.ckpt_path.parent.iterdir()):
            run.ckpt_path.parent.rmdir()  # a finished run keeps no empty checkpoint/ folder
    dist.barrier(run.world)
    return summary


from .package import callable_module  # noqa: E402

callable_module(__name__)  # lorakd.train(...) runs the API call lorakd.api.train (lorakd/package.py)
