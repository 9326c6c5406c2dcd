"""Train: the loop, its one-screen step, CUDA-graph replay of that step, checkpoints and exact resume."""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import RUN_FORMAT, __version__, atomic
from . import config as config_lib
from . import data as data_lib
from . import model as model_lib
from .distill import cached_teacher_logits, soften, student_loss
from .errors import UserError
from .evaluate import autocast, format_table, logits_for, metrics
from .model import amp_dtype, pick_device
from .runs import load_run, read_metrics, with_backbone


# ---------------------------------------------------------------- small pieces

def lr_factor(step: int, total: int, warmup: int, schedule: str, lr: float, lr_end: float = 1e-7) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based), as transformers' schedules define it."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if schedule == "polynomial":  # power 1 down to lr_end, transformers' default
        if step > total:
            return lr_end / lr
        return ((lr - lr_end) * (1 - progress) + lr_end) / lr
    return 1.0  # constant (after warmup)


def dist_env():
    """(rank, world, local_rank) as torchrun sets them; (0, 1, 0) for a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


# ---------------------------------------------------------------- the step

def make_step(model, optimizer, flat_grad, store, teacher_probs, acc, share, cfg, amp, world):
    """The whole training step on a batch given by indices into the token store. No host syncs inside,
    so it can be replayed as a CUDA graph; the loss parts add into `acc` on the device. `share` (a device
    scalar) is this process's part of the global batch times the process count: shards of uneven size
    then still average to the global batch's mean gradient."""
    dc, clip, device = cfg.distill, cfg.train.grad_clip, store.ids.device

    def step(idx, width, key=None):  # key: the graph key (GraphedStep's); the plain step needs none
        flat_grad.zero_()
        ids, mask = store.batch(idx, width)
        with autocast(device, amp):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        soft = None if teacher_probs is None else teacher_probs[idx]
        loss, ce, kd = student_loss(logits, store.labels[idx], soft, dc.alpha, dc.temperature)
        (loss * share if world > 1 else loss).backward()
        if world > 1:  # data parallel: average gradients over processes (torch.distributed, NCCL or gloo)
            torch.distributed.all_reduce(flat_grad)
            flat_grad.div_(world)
        if clip:  # clip_grad_norm_ over the one flat buffer, with no host sync
            flat_grad.mul_((clip / (flat_grad.norm() + 1e-6)).clamp(max=1.0))
        optimizer.step()
        parts = torch.stack([loss.detach(), ce.detach(), kd.detach()])
        acc.add_(parts * share if world > 1 else parts)  # weighted like the gradient: the global batch's mean

    return step


class GraphedStep:
    """Replays `step` as one CUDA graph per (batch, width) shape. Capturing a shape first runs the step
    on a side stream (lazy state, cuBLAS workspaces); weights, optimizer state and loss sums are then
    restored, so warm-up leaves no trace in training. In a multi-process run the key is the global
    batch's shape, the same on every process: all capture (and run their warm-up all-reduces) together."""

    def __init__(self, step, params, optimizer, acc):
        self.step, self.params, self.optimizer, self.acc = step, params, optimizer, acc
        self.graphs, self.pool = {}, None
        self.capture_s = 0.0  # time spent capturing, reported apart from steady-state replay

    def __call__(self, idx, width, key=None):
        key = key or (idx.shape[0], width)
        if key not in self.graphs:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            self.graphs[key] = self._capture(idx, width)
            torch.cuda.synchronize()
            self.capture_s += time.perf_counter() - t0
        graph, static_idx = self.graphs[key]
        static_idx.copy_(idx, non_blocking=True)
        graph.replay()

    def _capture(self, idx, width):
        saved_params = [p.detach().clone() for p in self.params]
        saved_state = {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                       for p, s in self.optimizer.state.items()}
        saved_acc = self.acc.clone()
        static_idx = idx.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(static_idx, width)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):  # graphs replay one at a time: they share a pool
            self.step(static_idx, width)
        self.pool = graph.pool()
        with torch.no_grad():
            for p, v in zip(self.params, saved_params):
                p.copy_(v)
            for p, s in self.optimizer.state.items():
                for k, v in s.items():
                    if torch.is_tensor(v):  # state born during warm-up is zeroed: as fresh as before
                        v.copy_(saved_state[p][k]) if p in saved_state else v.zero_()
            self.acc.copy_(saved_acc)
        return graph, static_idx


def make_optimizer(model, cfg, device):
    """AdamW, decay on weights but not biases or LayerNorm (as transformers.Trainer); on a GPU fused and
    capturable, with the lr in a device tensor so the schedule can change it between graph replays."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in named if n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n]
    decay = [p for n, p in named if all(p is not q for q in no_decay)]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if device.type == "cuda":
        lr = torch.tensor(cfg.train.lr, device=device)
        opt = torch.optim.AdamW(groups, lr=lr, fused=True, capturable=True)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.train.lr)
    return opt, [p for _, p in named]


def set_lr(optimizer, value: float):
    for g in optimizer.param_groups:
        if torch.is_tensor(g["lr"]):
            g["lr"].fill_(value)
        else:
            g["lr"] = value


def flat_gradients(params, device):
    """One buffer holding every gradient (params' .grad are views into it): one all-reduce, one norm."""
    flat = torch.zeros(sum(p.numel() for p in params), device=device)
    offset = 0
    for p in params:
        p.grad = flat[offset: offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


# ---------------------------------------------------------------- teachers

def teacher_probs_for(cfg, train_split, device, log):
    """Averaged softened teacher distributions over the training split, from each teacher's cache."""
    if not cfg.distill.teachers:
        return None
    all_logits = []
    for t in cfg.distill.teachers:
        t_cfg, t_info = load_run(t)
        t_cfg = with_backbone(t_cfg, t_info, teacher_backbone(cfg, t_cfg))
        data_key = data_lib.fingerprint(train_split, f"{t_cfg.model.backbone}|{t_cfg.data.max_length}")

        def compute(t=t, t_cfg=t_cfg):
            return compute_logits(t_cfg, t, train_split, device)

        t0 = time.time()
        logits, hit = cached_teacher_logits(t, data_key, compute)
        log(f"teacher {t}: logits {'from cache' if hit else 'computed and cached'} ({time.time() - t0:.1f}s)")
        if logits.shape != (len(train_split), len(cfg.data.label_names)):
            raise UserError(f"{t}: teacher logits have shape {tuple(logits.shape)}, expected "
                            f"({len(train_split)}, {len(cfg.data.label_names)}): different classes?")
        all_logits.append(logits)
    return soften(all_logits, list(cfg.distill.weights), cfg.distill.temperature).to(device)


def teacher_backbone(cfg, t_cfg):
    """A teacher trained elsewhere may name a backbone path that is not here: use the student's when the
    architectures match (with_backbone checks that), else the teacher's own."""
    try:
        model_lib.resolve_backbone(t_cfg.model.backbone)
        return None
    except UserError:
        return cfg.model.backbone


def compute_logits(run_cfg, run_dir, split, device):
    """A trained run's logits over a split, split across processes in a multi-GPU run and gathered."""
    rank, world, _ = dist_env()
    tok = model_lib.load_tokenizer(run_cfg.model.backbone)
    store = data_lib.TokenStore(data_lib.encode(tok, split.texts, run_cfg.data.max_length), None,
                                tok.pad_token_id or 0, device)
    model = model_lib.load_trained(run_cfg, run_dir, len(run_cfg.data.label_names)).to(device)
    if amp_dtype(run_cfg.train.precision, device) is not None:
        model_lib.freeze_to(model, torch.bfloat16)
    amp = amp_dtype(run_cfg.train.precision, device)
    shard = np.arange(rank, len(store), world)
    part = logits_for(model, store, run_cfg.train.eval_batch_size, amp, shard)
    if world == 1:
        return part
    return _gather_rows(part, shard, len(store), device)


def _gather_rows(part, shard, n, device):
    full = torch.zeros(n, part.shape[1], device=device)
    full[torch.as_tensor(shard, device=device)] = part.to(device)
    torch.distributed.all_reduce(full)  # each row is non-zero on exactly one rank
    return full.cpu()


# ---------------------------------------------------------------- the loop

def train(cfg, run_dir, resume=False, log=print) -> dict:
    """Train one run into run_dir; returns its summary (also in run.json)."""
    rank, world, local_rank = dist_env()
    device = pick_device(cfg.train.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.distributed.init_process_group("nccl", device_id=device)
        else:
            torch.distributed.init_process_group("gloo")
    if rank != 0:
        log = lambda *a, **k: None  # noqa: E731  only rank 0 talks and writes
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    tc = cfg.train
    if tc.batch_size % world:
        raise UserError(f"train.batch_size {tc.batch_size} does not split over {world} processes")
    num_labels = len(cfg.data.label_names)
    counts = model_lib.count_params(cfg.model, num_labels)
    model_lib.check_budget(cfg, counts)
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint" / "state.pt"
    state = None
    if resume:
        _, info = load_run(run_dir)
        if info.get("status") == "done":
            log(f"{run_dir}: already finished")
            return info["summary"]
        if ckpt_path.exists():
            state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    elif (run_dir / "run.json").exists():
        raise UserError(f"{run_dir}: a run already exists here; use --resume {run_dir} or another --out")

    torch.manual_seed(tc.seed)
    splits = data_lib.load_splits(cfg.data, tc.seed)
    tok = model_lib.load_tokenizer(cfg.model.backbone)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    stores = {name: data_lib.TokenStore(data_lib.encode(tok, s.texts, cfg.data.max_length), s.labels, pad_id, device)
              for name, s in splits.items() if len(s)}
    hf_config = model_lib.backbone_config(cfg.model.backbone, num_labels)
    if world > 1:  # every process has checked the folder before rank 0 writes to it
        torch.distributed.barrier()
    if rank == 0:
        if not resume:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic.write_text(run_dir / "config.yaml", config_lib.to_yaml(cfg))
            info = {"format": RUN_FORMAT, "lorakd": __version__, "name": cfg.name, "role": cfg.role,
                    "backbone": cfg.model.backbone, "backbone_fingerprint": model_lib.backbone_fingerprint(hf_config),
                    "params": counts, "status": "running",
                    "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            atomic.write_json(run_dir / "run.json", info)
        kept = [r for r in read_metrics(run_dir) if state and r["step"] <= state["step"]]
        atomic.write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
    log(f"run folder: {run_dir}")
    if world > 1:  # what each process runs: small shards make latency-bound steps (README: when it pays)
        log(f"data parallel: {world} processes ({device.type}), {tc.batch_size // world} rows each of every "
            f"global batch of {tc.batch_size}")
    log(f"trainable parameters: {counts['trainable']:,} of {counts['total']:,}"
        + (f" (budget {cfg.model.budget:,})" if cfg.role == "student" and cfg.model.budget else ""))

    model = model_lib.build(cfg.model, num_labels)  # the same initial weights on every process
    torch.manual_seed(tc.seed + rank)  # dropout masks differ across processes
    amp = amp_dtype(tc.precision, device)
    if amp is not None:
        model_lib.freeze_to(model, amp)
    model.to(device).train()
    teacher_probs = teacher_probs_for(cfg, splits["train"], device, log)
    optimizer, params = make_optimizer(model, cfg, device)
    flat_grad = flat_gradients(params, device)
    acc = torch.zeros(3, device=device)
    share = torch.ones((), device=device)
    if world > 1:
        torch.distributed.all_reduce(torch.zeros(1, device=device))  # communicator up before any capture
    step_fn = make_step(model, optimizer, flat_grad, stores["train"], teacher_probs, acc, share, cfg, amp, world)
    use_graphs = device.type == "cuda" and tc.cuda_graphs != "off"
    if tc.cuda_graphs == "on" and device.type != "cuda":
        raise UserError("train.cuda_graphs=on needs a CUDA device")
    run_step = GraphedStep(step_fn, params, optimizer, acc) if use_graphs else step_fn

    train_store = stores["train"]
    # A last batch smaller than the process count would leave a process idle: it is dropped.
    full, rest = divmod(len(train_store), tc.batch_size)
    steps_per_epoch = full + (rest >= world)
    total = tc.max_steps or math.ceil(tc.epochs * steps_per_epoch)
    warmup = math.ceil(tc.warmup_ratio * total)
    eval_every = tc.eval_every or steps_per_epoch
    step, acc_steps, train_time, samples = 0, 0, 0.0, 0
    best = {"accuracy": -1.0, "step": 0}
    best_state = None
    if state is not None:
        step, acc_steps, train_time, samples = state["step"], state["acc_steps"], state["train_time"], state["samples"]
        best, best_state = state["best"], state["best_state"]
        with torch.no_grad():
            for p, v in zip(params, state["trainable"]):
                p.copy_(v)
        lr_tensor = optimizer.param_groups[0]["lr"]
        optimizer.load_state_dict(state["optimizer"])
        for g in optimizer.param_groups:
            g["lr"] = lr_tensor
        acc.copy_(state["acc"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        log(f"resumed at step {step} of {total}")

    writer = None
    if tc.tensorboard and rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run_dir / "tensorboard"))

    def record(rec):
        if rank == 0:
            atomic.append_line(run_dir / "metrics.jsonl", json.dumps(rec))
            if writer:
                for k, v in rec.items():
                    if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                        writer.add_scalar(f"{rec['split']}/{k}", v, rec["step"])

    def reduce_mean(t):
        if world > 1:
            torch.distributed.all_reduce(t)
            t /= world
        return t

    def flush_train_log(lr):
        nonlocal acc_steps
        if acc_steps == 0:
            return
        loss, ce, kd = (reduce_mean(acc.clone()) / acc_steps).tolist()  # the one host sync per log
        if not all(math.isfinite(v) for v in (loss, ce, kd)):
            kept = f"the last good checkpoint is kept in {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written"
            raise UserError(f"training loss became {loss} by step {step}; stopped ({kept}); try a lower train.lr")
        rec = {"step": step, "epoch": round(step / steps_per_epoch, 4), "split": "train", "loss": loss, "lr": lr,
               "samples_per_s": samples / max(train_time, 1e-9)}
        if teacher_probs is not None:
            rec.update(ce=ce, kd=kd)
        record(rec)
        acc.zero_()
        acc_steps = 0
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rec['samples_per_s']:.0f}")

    def evaluate_now():
        nonlocal best, best_state
        if "validation" not in stores:
            return
        store = stores["validation"]
        shard = np.arange(rank, len(store), world)
        logits = logits_for(model, store, tc.eval_batch_size, amp, shard)
        if world > 1:
            logits = _gather_rows(logits, shard, len(store), device)
        m = metrics(logits, splits["validation"].labels, cfg.data.label_names)
        record({"step": step, "epoch": round(step / steps_per_epoch, 4), "split": "validation",
                "loss": m["loss"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]})
        log(f"step {step}/{total}  validation accuracy {m['accuracy']:.4f}  loss {m['loss']:.4f}")
        if m["accuracy"] > best["accuracy"]:
            best = {"accuracy": m["accuracy"], "step": step}
            best_state = [p.detach().to("cpu", copy=True) for p in params]
            if rank == 0:
                model_lib.save_trained(model, run_dir / ("model" if cfg.model.full_finetune else "adapter"),
                                       cfg.model.full_finetune)

    def save_checkpoint():
        if not torch.isfinite(acc).all():  # never checkpoint a diverged model: the log check names the step
            flush_train_log(lr_now)
        if rank != 0:
            return
        atomic.torch_save(ckpt_path, {
            "step": step, "acc_steps": acc_steps, "acc": acc.cpu(), "train_time": train_time, "samples": samples,
            "best": best, "best_state": best_state, "trainable": [p.detach().cpu() for p in params],
            "optimizer": optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}})

    stop = {"signal": None}

    def on_sigterm(signum, frame):
        stop["signal"] = signum

    old_handler = signal.signal(signal.SIGTERM, on_sigterm) if rank == 0 or world == 1 else None
    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, disable=rank != 0 or None, dynamic_ncols=True, mininterval=1.0)
    epoch_batches = (None,)
    lr_now = tc.lr
    try:
        while step < total:
            epoch, pos = divmod(step, steps_per_epoch)
            if epoch_batches[0] != epoch:  # the epoch's shards go to the device at once: no copy per step
                batches = data_lib.batch_order(train_store.lengths_np, tc.batch_size, tc.seed, epoch,
                                               cfg.data.group_by_length)
                batches = [b for b in batches if len(b) >= world]
                shards = [b[rank::world] for b in batches]
                starts = np.cumsum([0] + [len(b) for b in shards])
                epoch_batches = (epoch, batches, shards, starts, torch.as_tensor(np.concatenate(shards), device=device))
            _, batches, shards, starts, on_device = epoch_batches
            shard = shards[pos]
            lr_now = tc.lr * lr_factor(step, total, warmup, tc.schedule, tc.lr)
            t0 = time.perf_counter()
            set_lr(optimizer, lr_now)
            if world > 1:
                share.fill_(len(shard) * world / len(batches[pos]))
            width = train_store.width(batches[pos])  # the global batch's: every process has the same shape
            idx = on_device[starts[pos]: starts[pos + 1]]
            run_step(idx, width, (len(batches[pos]), width))
            step += 1
            acc_steps += 1
            samples += len(batches[pos])
            if device.type == "cuda" and (step % tc.log_every == 0 or step % eval_every == 0 or step == total):
                torch.cuda.synchronize(device)  # time only where we would sync anyway
            train_time += time.perf_counter() - t0
            bar.update(1)
            if step % tc.log_every == 0 or step == total:
                flush_train_log(lr_now)
            if step % eval_every == 0 or step == total:
                evaluate_now()
            if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or stop["signal"]:
                save_checkpoint()
            if stop["signal"]:
                log(f"stopped by signal at step {step}; continue with: lorakd train --resume {run_dir}")
                sys.exit(143)
    finally:
        bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        if writer:
            writer.close()

    # The best checkpoint by validation accuracy is the run's result.
    if best_state is not None:
        with torch.no_grad():
            for p, v in zip(params, best_state):
                p.copy_(v.to(device))
    elif rank == 0:
        model_lib.save_trained(model, run_dir / ("model" if cfg.model.full_finetune else "adapter"),
                               cfg.model.full_finetune)
    results = {}
    for name in ("validation", "test"):
        if name in stores and rank == 0:
            results[name] = metrics(logits_for(model, stores[name], tc.eval_batch_size, amp),
                                    splits[name].labels, cfg.data.label_names)
            log(format_table(name, results[name]))
    capture_s = getattr(run_step, "capture_s", 0.0)  # this process's captures (a resumed run: since resuming)
    summary = {"best_step": best["step"], "steps": step, "train_time_s": round(train_time, 3),
               "samples_per_s": samples / max(train_time, 1e-9), "graph_capture_s": round(capture_s, 3),
               "cuda_graphs": len(getattr(run_step, "graphs", {})), "trainable": counts["trainable"],
               "total": counts["total"], "device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else "cpu", "world_size": world}
    for name, m in results.items():
        summary[f"{name}_accuracy"] = m["accuracy"]
    if rank == 0:
        atomic.write_json(run_dir / "eval.json", results)
        info = json.loads((run_dir / "run.json").read_text())
        info.update(status="done", summary=summary,
                    finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        atomic.write_json(run_dir / "run.json", info)
        ckpt_path.unlink(missing_ok=True)
    if world > 1:
        torch.distributed.barrier()
    return summary
