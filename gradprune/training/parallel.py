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


# --- sharded training (FSDP2): weights, gradients and optimizer state split over processes ---

def check_sharding(sharding: str) -> None:
    """Stop before compute when finetune.sharding asks to shard over processes this launch does
    not have."""
    from gradprune.config import ParamError

    if sharding == "fsdp" and rank_and_size()[1] < 2:
        raise ParamError("finetune.sharding",
                         "fsdp shards the model over processes, but this is one process; launch "
                         "the stage with `torchrun --standalone --nproc-per-node N -m "
                         "tasks.finetune` (N >= 2), or set finetune.sharding: none")


def shard_model(model: nn.Module) -> None:
    """Shard a LLaMA in place with `fully_shard`: each decoder layer is one unit (its weights
    gathered for its forward and backward only), the root holds the rest (embeddings, final
    norm, LM head). Gradients are summed over processes, not averaged, as all_reduce_gradients
    sums them: the loop already weights each process's loss by its share of the batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    # Over the model's own device type (fully_shard's default is the machine's accelerator,
    # which a `device: cpu` run on a GPU machine does not use).
    device_type = next(model.parameters()).device.type
    mesh = init_device_mesh(device_type, (rank_and_size()[1],))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # A plain sum: gloo has no pre-scaled sum (PREMUL_SUM), and the factor is 1.
            module.set_force_sum_reduction_for_comms(True)


def is_sharded(model: nn.Module) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def like_parameter(tensor: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """`tensor`, of a parameter's full shape, on its device and split as it is: a sharded
    parameter (a DTensor) gets this process's shard, so elementwise products with the
    parameter, its gradient or its optimizer state stay local."""
    tensor = tensor.to(parameter.device)
    if not dist.is_available():  # a torch build without torch.distributed has no DTensor
        return tensor
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(parameter, DTensor):
        return tensor
    # Every process holds the same full tensor: each slices its own shard, no communication.
    return distribute_tensor(tensor, parameter.device_mesh, parameter.placements,
                             src_data_rank=None)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded (DTensor) tensor; any other tensor as it is."""
    if not dist.is_available():
        return tensor
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def sharded_like(parameter: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """A saved shard as a tensor split as `parameter` is (a DTensor), or as it is."""
    if not dist.is_available():
        return local
    from torch.distributed.tensor import DTensor

    if not isinstance(parameter, DTensor) or local.ndim == 0:  # AdamW's step count
        return local
    return DTensor.from_local(local, parameter.device_mesh, parameter.placements,
                              run_check=False, shape=parameter.shape, stride=parameter.stride())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights as host tensors on the main process ({} on the others), each
    tied weight once under the name safetensors' save_model keeps (the first in sorted order),
    so a sharded model's file equals an unsharded one's. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                  cpu_offload=True))
    if not state:
        return {}
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    for names in names_of.values():
        for tied in sorted(names)[1:]:
            del state[tied]
    return state
