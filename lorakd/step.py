"""The step: one optimizer step on a batch (forward, loss, backward, flat gradient, clipping, AdamW), the
optimizer and lr schedule it uses, and TrainState, the resumable state with its save/load."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from . import atomic
from . import config as config_lib
from . import data as data_lib
from . import distill
from . import graphs
from .graphs import autocast


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
