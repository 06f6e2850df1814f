"""Where a stage computes: the `device` param resolved to a torch.device, bf16 autocast on that
device's type, and its peak memory.

The library never names a device in autocast or tensor creation: a stage places the model
(gradprune.models.llama.load_model(..., device=...)) and everything else follows the model's
device (`model_device`).
"""

from __future__ import annotations

import contextlib
import os
import re
from contextlib import AbstractContextManager

import torch
from torch import nn

from gradprune.config import ParamError
from gradprune.config.choices import DEVICE_PATTERN


def resolve_device(setting: str) -> torch.device:
    """The device the `device` param names: auto is CUDA when present, else the CPU.

    Under torchrun a plain "cuda" or "auto" means this process's GPU (LOCAL_RANK), so every rank
    computes on its own; a resolved GPU becomes the process's current CUDA device. A CUDA device on a machine without one (or an index past the last GPU)
    raises ParamError before anything is computed.
    """
    if not re.fullmatch(DEVICE_PATTERN, setting):
        raise ParamError("device", f"got {setting!r}; allowed: auto, cpu, cuda, cuda:N")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ParamError("device", f"{setting!r} asks for a CUDA GPU but torch sees none "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                         "set device: cpu, or auto to use a GPU only when there is one")
    if setting in ("auto", "cuda"):
        index = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        index = int(setting.split(":")[1])
    if index >= torch.cuda.device_count():
        raise ParamError("device", f"{setting!r} needs GPU {index} but this machine has "
                         f"{torch.cuda.device_count()}; pick one of cuda:0..cuda:"
                         f"{torch.cuda.device_count() - 1}")
    # The current CUDA device too, so that NCCL collectives of this rank (barrier) use it.
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def device_name(device: torch.device) -> str:
    """What the device is, for reports: the GPU's product name, or the CPU's kind."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.backends.cpu.get_cpu_capability()})"


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (the first one's: a stage keeps them together)."""
    return next(model.parameters()).device


def bf16_autocast(device: torch.device, enabled: bool) -> AbstractContextManager:
    """bf16 autocast on the device type the computation actually runs on; nothing when off
    (so a model on the meta device, which has no autocast, runs too)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def bf16_supported(device: torch.device) -> bool:
    """Native bf16 arithmetic: a CPU with AVX-512 or AMX, a GPU that reports it (Ampere on)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak bytes allocated on a CUDA device since the last reset; None on the CPU, whose peak
    is the process's resident set (the stage runner records it)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)
