"""Merging fine-tuning checkpoints: theta = sum_i a_i * theta_i, then re-masked."""

from __future__ import annotations

import math
from pathlib import Path

import torch


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


def average_checkpoints(paths: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted sum of safetensors state dicts, accumulated in fp64, one checkpoint in memory."""
    from safetensors.torch import load_file

    merged: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path, weight in zip(paths, weights, strict=True):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: checkpoint missing; rerun the finetune stage")
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
