"""Saliency criteria: small pure functions from a weight and its statistics to scores.

Higher score = more important = kept. Every criterion reads the same statistics collected once
by the gradients stage, so changing the criterion never reruns the gradient pass. Statistics per
Linear: grad_mean E[g], grad_abs_mean E|g|, grad_sq_mean E[g^2] (expectations over calibration
blocks, g the gradient of one block's mean loss) and act_norm ||X_j||, the L2 norm of input
channel j over all calibration tokens.

SparseGPT is listed in CRITERIA but has no score function: it rewrites the kept weights while it
chooses the mask, so it lives in gradprune.pruning.sparsegpt.
"""

from __future__ import annotations

import math
import zlib

import torch

from gradprune.config.choices import CRITERIA, GRADIENT_VARIANTS, TAYLOR_VARIANTS
from gradprune.config.choices import CRITERIA_SCORED as SCORED

# The GBLM reference multiplies every gradient by this before taking its norm over samples.
GBLM_REFERENCE_SCALE = 100.0


def gradient(weight: torch.Tensor, stats: dict[str, torch.Tensor],
             variant: str = "mean") -> torch.Tensor:
    """The seed's criterion |dL/dw| = |E[g]| (L the mean calibration loss), or E|g|, sqrt(E[g^2]).

    |E[g]| lets gradients of opposite sign cancel across blocks; E|g| and sqrt(E[g^2]) measure
    how strongly the loss reacts to w on a typical block instead.
    """
    if variant == "mean":
        return stats["grad_mean"].abs()
    if variant == "abs_mean":
        return stats["grad_abs_mean"]
    if variant == "rms":
        return stats["grad_sq_mean"].sqrt()
    raise ValueError(f"masks.variant: got {variant!r}; allowed for gradient: "
                     f"{', '.join(GRADIENT_VARIANTS)}")


def taylor(weight: torch.Tensor, stats: dict[str, torch.Tensor],
           variant: str = "mean") -> torch.Tensor:
    """First-order Taylor estimate of the loss change from zeroing w.

    "mean": |w * E[g]| (SNIP on the mean loss). "abs_mean": E|w * g| per block, which equals
    |w| * E|g| because w does not change while the calibration gradients are collected.
    """
    if variant == "mean":
        return (weight * stats["grad_mean"]).abs()
    if variant == "abs_mean":
        return weight.abs() * stats["grad_abs_mean"]
    raise ValueError(f"masks.variant: got {variant!r}; allowed for taylor: "
                     f"{', '.join(TAYLOR_VARIANTS)}")


def fisher(weight: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Optimal Brain Damage with the empirical Fisher as the Hessian diagonal: 0.5 w^2 E[g^2]."""
    return 0.5 * weight.square() * stats["grad_sq_mean"]


def magnitude(weight: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    return weight.abs()


def wanda(weight: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """|W_ij| * ||X_j||; the Wanda paper compares these within each output row (scope per_row)."""
    return weight.abs() * stats["act_norm"].unsqueeze(0)


def gblm(weight: torch.Tensor, stats: dict[str, torch.Tensor], alpha: float,
         n_blocks: int) -> torch.Tensor:
    """GBLM-Pruner: |W_ij| * (||X_j|| + alpha * ||G_ij||).

    ||G_ij|| is the L2 norm of w_ij's gradient over the calibration blocks, one gradient per
    block: sqrt(sum_b g_b^2) = sqrt(n_blocks * E[g^2]).
    """
    grad_norm = (n_blocks * stats["grad_sq_mean"]).sqrt()
    return weight.abs() * (stats["act_norm"].unsqueeze(0) + alpha * grad_norm)


def random_uniform(weight: torch.Tensor, seed: int, name: str) -> torch.Tensor:
    """Uniform scores in [0, 1): the floor any criterion must beat.

    Seeded per tensor from (seed, name), so a tensor's scores do not depend on which other
    tensors are pruned alongside it. One 32-bit hash of both: the CPU generator keeps only the
    low 32 bits of its seed.
    """
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
    # Drawn by the host generator on every device, so a seed gives the same mask on a GPU.
    return torch.rand(weight.shape, generator=generator).to(weight.device)


# The statistics (gradprune.pruning.stats) each criterion reads, per variant.
STATISTICS_READ = {
    ("gradient", "mean"): ("grad_mean",), ("gradient", "abs_mean"): ("grad_abs_mean",),
    ("gradient", "rms"): ("grad_sq_mean",),
    ("taylor", "mean"): ("grad_mean",), ("taylor", "abs_mean"): ("grad_abs_mean",),
    ("fisher", "mean"): ("grad_sq_mean",), ("magnitude", "mean"): (),
    ("wanda", "mean"): ("act_norm",), ("gblm", "mean"): ("grad_sq_mean", "act_norm"),
    ("random", "mean"): (), ("sparsegpt", "mean"): ("hessian",),
}


def statistics_for(criteria: list[tuple[str, str]]) -> set[str]:
    """The statistics that pruning by these (criterion, variant) pairs reads: all the gradient
    pass needs to collect for them."""
    needed = set()
    for criterion, variant in criteria:
        if (criterion, variant) not in STATISTICS_READ:
            raise ValueError(f"masks.criterion/variant: no criterion {criterion!r} with variant "
                             f"{variant!r}; allowed criteria: {', '.join(CRITERIA)}")
        needed.update(STATISTICS_READ[criterion, variant])
    return needed


def scores_for(criterion: str, weights: dict[str, torch.Tensor],
               stats: dict[str, dict[str, torch.Tensor]], *, variant: str = "mean",
               gblm_alpha: float | None = None, n_blocks: int | None = None,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Float32 contiguous scores per weight name for a score-based criterion.

    variant: for gradient ("mean", "abs_mean", "rms") and taylor ("mean", "abs_mean") only.
    gblm_alpha, n_blocks: for gblm; n_blocks is the number of calibration blocks behind the
    statistics (the gradients stage records it, see stats.load_stats_info). gblm_alpha None
    reproduces the GBLM reference's weighting: it scales gradients by 100 and uses the per-sample
    RMS activation norm ||X_j|| / sqrt(n_blocks), which in our units is alpha = 100 * sqrt(n_blocks).
    seed: for random only.
    """
    if criterion == "sparsegpt":
        raise ValueError("masks.criterion: sparsegpt rewrites the kept weights while it chooses "
                         "the mask; call gradprune.pruning.sparsegpt.sparsegpt_prune, not scores_for")
    if criterion not in SCORED:
        raise ValueError(f"masks.criterion: got {criterion!r}; allowed: {', '.join(CRITERIA)}")
    if variant != "mean" and criterion not in ("gradient", "taylor"):
        raise ValueError(f"masks.variant: got {variant!r}; only gradient and taylor have "
                         "variants, leave it at 'mean'")
    if criterion == "gblm":
        if n_blocks is None or n_blocks < 1:
            raise ValueError(f"gblm needs the number of calibration blocks, got {n_blocks!r}")
        alpha = GBLM_REFERENCE_SCALE * math.sqrt(n_blocks) if gblm_alpha is None else gblm_alpha

    def score(name: str, weight: torch.Tensor) -> torch.Tensor:
        per = stats[name]
        if criterion == "gradient":
            return gradient(weight, per, variant)
        if criterion == "taylor":
            return taylor(weight, per, variant)
        if criterion == "gblm":
            return gblm(weight, per, alpha, n_blocks)
        if criterion == "random":
            return random_uniform(weight, seed, name)
        return {"fisher": fisher, "magnitude": magnitude, "wanda": wanda}[criterion](weight, per)

    return {name: score(name, weights[name].float()).float().contiguous() for name in weights}
