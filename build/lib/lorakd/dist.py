"""Data parallelism under torchrun: the process environment, and averaging / gathering across processes.

Every helper is a no-op in a plain single-process run, so callers need no `if world > 1` of their own."""
from __future__ import annotations

import os

import numpy as np
import torch


def env():
    """(rank, world, local_rank) as torchrun sets them; (0, 1, 0) for a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init(device, world: int):
    """Join the process group (NCCL on a GPU, gloo on a CPU) and bring the communicator up."""
    if world == 1 or torch.distributed.is_initialized():
        return
    if device.type == "cuda":
        torch.distributed.init_process_group("nccl", device_id=device)
    else:
        torch.distributed.init_process_group("gloo")


def barrier(world: int):
    if world > 1:
        torch.distributed.barrier()


def reduce_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        torch.distributed.all_reduce(t)
        t /= world
    return t


def shard(n: int, rank: int, world: int) -> np.ndarray:
    """This process's rows of n: every world-th one."""
    return np.arange(rank, n, world)


def gather_rows(part: torch.Tensor, rows: np.ndarray, n: int, world: int, device) -> torch.Tensor:
    """[n, C] on the CPU from each process's rows `rows` of it (their values `part`)."""
    if world == 1:
        return part
    full = torch.zeros(n, part.shape[1], device=device)
    full[torch.as_tensor(rows, device=device)] = part.to(device)
    torch.distributed.all_reduce(full)  # each row is non-zero on exactly one rank
    return full.cpu()
