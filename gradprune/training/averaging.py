"""Merging fine-tuning checkpoints: theta = sum_i a_i * theta_i, then re-masked.

Every checkpoint comes from the same mask, so every weighted average of them is exactly as
sparse; re-masking the merge anyway makes that hold whatever the files contain.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import torch

from gradprune.io import reading

log = logging.getLogger(__name__)


def checkpoint_weights(val_losses: list[float], method: str, temperature: float) -> list[float]:
    """`uniform`: a_i = 1/n (the seed). `val_weighted`: softmax(-val_loss / temperature)."""
    if not val_losses:
        raise ValueError("no checkpoints to average")
    if method == "uniform":
        return [1.0 / len(val_losses)] * len(val_losses)
    if method == "val_weighted":
        best = min(val_losses)
        raw = [math.exp(-(v - best) / temperature) for v in val_losses]
        return [r / sum(raw) for r in raw]
    raise ValueError(f"average.method: got {method!r}; allowed: 'uniform', 'val_weighted'")


def swa_weights(steps: list[int], run_ends: list[int], fraction: float) -> list[float]:
    """Uniform over the checkpoints in the last `fraction` of their run (stochastic weight
    averaging over each run's tail); checkpoint i was saved at steps[i] of a run that ended at
    run_ends[i]. A run's last checkpoint always counts."""
    inside = [step == end or step > (1 - fraction) * end for step, end in zip(steps, run_ends,
                                                                              strict=True)]
    if not any(inside):
        raise ValueError("no checkpoints to average")
    return [1.0 / sum(inside) if i else 0.0 for i in inside]


def average_checkpoints(paths: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted sum of safetensors state dicts, accumulated in fp64, one checkpoint in memory.
    Checkpoints of weight zero are not read."""
    from safetensors.torch import load_file

    if len(paths) != len(weights):
        raise ValueError(f"{len(paths)} checkpoints but {len(weights)} weights")
    merged: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path, weight in zip(paths, weights, strict=True):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: checkpoint missing; rerun the finetune stage")
        if weight == 0:
            continue
        with reading(path, "checkpoint"):
            state = load_file(str(path))
        if merged and state.keys() != merged.keys():
            raise ValueError(f"{path}: holds other tensors than the first checkpoint")
        for key, value in state.items():
            dtypes[key] = value.dtype
            if key in merged:
                merged[key] += weight * value.double()
            else:
                merged[key] = weight * value.double()
    return {key: value.to(dtypes[key]) for key, value in merged.items()}


def remask(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero the pruned entries of a state dict in place (masks are named by Linear module)."""
    for name, mask in masks.items():
        weight = state[f"{name}.weight"]
        weight.mul_(mask.to(weight.dtype))
    return state


def merge(paths: list[Path], weights: list[float],
          masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weighted average of the checkpoints, re-masked."""
    return remask(average_checkpoints(paths, weights), masks)


def greedy_soup(paths: list[Path], val_losses: list[float], masks: dict[str, torch.Tensor],
                val_loss_of: Callable[[dict[str, torch.Tensor]], float]) -> tuple[list[float], float]:
    """Greedy soup (Wortsman et al., 2022): starting from the best checkpoint, try the others in
    order of validation loss and keep each only if the uniform average of the soup with it has a
    lower validation loss than the soup without it.

    Returns the weights (1/k for the k checkpoints in the soup, 0 for the rest) and the soup's
    validation loss.
    """
    if not paths:
        raise ValueError("no checkpoints to average")
    ranked = sorted(range(len(paths)), key=lambda i: (val_losses[i], i))
    soup, soup_loss = [ranked[0]], val_losses[ranked[0]]
    for candidate in ranked[1:]:
        trial = soup + [candidate]
        loss = val_loss_of(merge([paths[i] for i in trial], [1 / len(trial)] * len(trial), masks))
        kept = loss < soup_loss
        log.info("greedy soup: %s %s (val loss %.4f, soup %.4f)", Path(paths[candidate]).name,
                 "kept" if kept else "left out", loss, soup_loss)
        if kept:
            soup, soup_loss = trial, loss
    return [1 / len(soup) if i in soup else 0.0 for i in range(len(paths))], soup_loss
