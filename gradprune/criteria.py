"""Saliency criteria: small pure functions from a weight and its statistics to scores.

Higher score = more important = kept. Every criterion reads the same statistics collected once
by the gradients stage, so changing the criterion never reruns the gradient pass.
"""

from __future__ import annotations

import torch


def gradient(weight: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """The seed's criterion |dL/dw|, with L the mean loss over the calibration set."""
    return stats["grad_mean"].abs()


def magnitude(weight: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    return weight.abs()


def taylor(weight: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """First-order Taylor estimate of the loss change from zeroing w: |w * dL/dw|."""
    return (weight * stats["grad_mean"]).abs()


CRITERIA = {"gradient": gradient, "magnitude": magnitude, "taylor": taylor}


def scores_for(criterion: str, weights: dict[str, torch.Tensor],
               stats: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if criterion not in CRITERIA:
        raise ValueError(f"masks.criterion: got {criterion!r}; allowed: {', '.join(CRITERIA)}")
    fn = CRITERIA[criterion]
    return {name: fn(weights[name].float(), stats[name]).float().contiguous() for name in weights}
