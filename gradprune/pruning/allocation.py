"""How a target sparsity is spread over the decoder layers: uniformly, or by OWL.

OWL (outlier-weighted layerwise sparsity; Yin et al., 2023): a decoder layer whose Wanda scores
|W_ij| * ||X_j|| hold more outliers (scores above M times the layer's mean score) matters more
and is pruned less. With D_l the outlier ratio of layer l and r_l = (D_l - min D) /
(max D - min D) in [0, 1], layer l's sparsity is

    s_l = s - 2 * lambda * (r_l - mean r),

so the sparsities span 2 * lambda (s +- lambda when the ratios are evenly spread) and their
mean, weighted by each layer's prunable weights, is the target s. Every Linear of a layer gets
the layer's sparsity. The reference computes D_l from activations of the dense model, as the
gradients stage collects act_norm: the same statistics serve here.

Counts are whole weights: the round(s * N) weights pruned overall are shared among the
tensors by largest remainder, and each tensor's target is its count over its size, so a
per-tensor selection (scope per_layer, sparsegpt) prunes exactly round(s * N) weights.
"""

from __future__ import annotations

import math
import re

import torch

_DECODER_LAYER = re.compile(r"^(.*layers\.\d+)\.")


def decoder_layer(name: str) -> str:
    """The decoder (or encoder) layer a Linear belongs to: 'model.layers.3' for
    'model.layers.3.mlp.up_proj'; a name outside any numbered layer is its own group."""
    match = _DECODER_LAYER.match(name)
    return match.group(1) if match else name


def outlier_ratios(weights: dict[str, torch.Tensor], stats: dict[str, dict[str, torch.Tensor]],
                   threshold: float) -> dict[str, float]:
    """Per decoder layer: the fraction of its Wanda scores |W_ij| * ||X_j|| (over all its
    Linears in `weights` together) above `threshold` times their mean."""
    scores: dict[str, list[torch.Tensor]] = {}
    for name, weight in weights.items():
        score = weight.float().abs() * stats[name]["act_norm"].float().unsqueeze(0)
        scores.setdefault(decoder_layer(name), []).append(score.reshape(-1))
    ratios = {}
    for layer, parts in scores.items():
        flat = torch.cat(parts)
        ratios[layer] = (flat > threshold * flat.mean()).double().mean().item()
    return ratios


def layer_sparsities(ratios: dict[str, float], sizes: dict[str, int], sparsity: float,
                     max_deviation: float) -> dict[str, float]:
    """OWL's sparsity per layer from its outlier ratio (see the module docstring); equal ratios
    give every layer the target."""
    low, high = min(ratios.values()), max(ratios.values())
    spread = high - low
    relative = {layer: (d - low) / spread if spread > 0 else 0.0 for layer, d in ratios.items()}
    total = sum(sizes.values())
    mean = sum(relative[layer] * sizes[layer] for layer in relative) / total
    sparsities = {layer: sparsity - 2 * max_deviation * (r - mean)
                  for layer, r in relative.items()}
    bad = {layer: s for layer, s in sparsities.items() if not 0 <= s < 1}
    if bad:
        layer, value = next(iter(bad.items()))
        raise ValueError(f"masks.owl.max_deviation={max_deviation} gives {layer} sparsity "
                         f"{value:.3f}, outside [0, 1); lower it")
    return sparsities


def whole_weight_targets(ideal: dict[str, float], sizes: dict[str, int],
                         total: int) -> dict[str, float]:
    """Targets count / size per tensor whose counts are whole, sum to `total` and are each the
    floor or ceiling of ideal * size: the largest remainders get the extra weight, ties in
    name order."""
    exact = {name: ideal[name] * sizes[name] for name in sorted(ideal)}
    counts = {name: math.floor(x) for name, x in exact.items()}
    extra = total - sum(counts.values())
    if not 0 <= extra <= len(counts):
        raise ValueError(f"cannot share {total} pruned weights among tensors whose ideal counts "
                         f"sum to {sum(exact.values()):.1f}")
    by_remainder = sorted(exact, key=lambda name: -(exact[name] - counts[name]))
    for name in by_remainder[:extra]:
        counts[name] += 1
    return {name: counts[name] / sizes[name] for name in ideal}


def owl_targets(weights: dict[str, torch.Tensor], stats: dict[str, dict[str, torch.Tensor]],
                targets: dict[str, float], sparsity: float, outlier_threshold: float,
                max_deviation: float) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """OWL's target per tensor, and per decoder layer its outlier ratio and sparsity.

    Tensors whose target is 0 (kept dense by masks.exclude) keep it and take no part; the
    others share round(sparsity * their weights) pruned weights.
    """
    pruned = {name: w for name, w in weights.items() if targets[name] > 0}
    if not pruned:
        return dict(targets), {}
    ratios = outlier_ratios(pruned, stats, outlier_threshold)
    sizes: dict[str, int] = {}
    for name, weight in pruned.items():
        sizes[decoder_layer(name)] = sizes.get(decoder_layer(name), 0) + weight.numel()
    per_layer = layer_sparsities(ratios, sizes, sparsity, max_deviation)
    allocated = whole_weight_targets(
        {name: per_layer[decoder_layer(name)] for name in pruned},
        {name: w.numel() for name, w in pruned.items()},
        round(sparsity * sum(sizes.values())))
    report = {layer: {"outlier_ratio": ratios[layer], "sparsity": per_layer[layer]}
              for layer in sorted(ratios, key=_natural)}
    return {**targets, **allocated}, report


def _natural(name: str) -> list:
    """'model.layers.10' after 'model.layers.9'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
