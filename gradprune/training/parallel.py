"""Data parallelism over torch.distributed: which share of the work is this process's, and sums
across processes.

Without an initialized process group (a plain `python -m tasks.<stage>`) this is one process
holding everything: every share is the whole, every reduction is a no-op, so single-process
results stay bit-identical. Under `torchrun` the stage runner (tasks/stage.py) initializes the
group; the library only splits work and reduces.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def rank_and_size() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """The process that writes outputs and tracks: rank 0, or the only one."""
    return rank_and_size()[0] == 0


def share(items: torch.Tensor) -> torch.Tensor:
    """This process's share of `items` (along the first dimension): every size-th from its rank,
    so shares differ by at most one item."""
    rank, size = rank_and_size()
    return items if size == 1 else items[rank::size]


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over all processes, in place."""
    if rank_and_size()[1] == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def all_reduce_gradients(model: nn.Module) -> None:
    """Sum the gradients of every trainable parameter over all processes, in place; a parameter
    without a gradient in this process counts as zero."""
    if rank_and_size()[1] == 1:
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def barrier() -> None:
    """Wait until every process gets here (after the main process wrote what others read)."""
    if rank_and_size()[1] > 1:
        dist.barrier()


def init_process_group_from_env() -> None:
    """Join the process group that `torchrun` describes in the environment (WORLD_SIZE, RANK,
    MASTER_ADDR...): CPU tensors travel over gloo, CUDA tensors over NCCL."""
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")


def shutdown_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
