"""Masks from scores: a threshold tau, an exact target sparsity, or an N:M pattern; bit-packed
storage.

A mask is a bool tensor shaped like its weight, True where the weight is kept. Targets apply
over all tensors jointly (global), per tensor (per_layer) or per output row (per_row), with
per-tensor overrides resolved from fnmatch patterns by sparsity_targets.

Exact selection without sorting: scores are non-negative float32, whose IEEE-754 bit patterns
read as int32 sort in the same order as the values. A two-pass radix select counts the high 16
bits of every score into a 65,536-bin histogram, finds the bin holding the k-th smallest score,
then histograms the low 16 bits of that bin's members. Memory is two histograms plus one
chunk's temporaries, whatever the number of scores; ties at the threshold are broken by
position (tensors in name order, then flat index), so the pruned count is exactly k.
"""

from __future__ import annotations

import json
import math
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from gradprune.config.choices import SCOPES
from gradprune.training.parallel import like_parameter

CHUNK = 1 << 24
HALF = 1 << 16


def _chunks(scores: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    for tensor in scores:
        flat = tensor.reshape(-1)
        for start in range(0, flat.numel(), CHUNK):
            # Clearing the sign bit maps -0.0 onto 0.0; negative scores are rejected earlier.
            yield flat[start:start + CHUNK].view(torch.int32) & 0x7FFFFFFF


def check_scores(name: str, score: torch.Tensor) -> None:
    if score.dtype != torch.float32:
        raise TypeError(f"scores for {name} must be float32, got {score.dtype}")
    if not torch.isfinite(score).all() or (score < 0).any():
        raise ValueError(f"scores for {name} hold negative, NaN or inf values; the statistics "
                         "are corrupt or the model diverged")


def kth_smallest(scores: list[torch.Tensor], k: int) -> tuple[float, int]:
    """The k-th smallest score (1-based) over all tensors, and how many scores lie below it."""
    total = sum(t.numel() for t in scores)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside [1, {total}]")
    device = scores[0].device
    high = torch.zeros(HALF, dtype=torch.int64, device=device)
    for bits in _chunks(scores):
        high += torch.bincount(bits >> 16, minlength=HALF)
    cum = high.cumsum(0)
    bucket = int(torch.searchsorted(cum, k))
    below = int(cum[bucket - 1]) if bucket > 0 else 0
    low = torch.zeros(HALF, dtype=torch.int64, device=device)
    for bits in _chunks(scores):
        inside = bits[(bits >> 16) == bucket]
        low += torch.bincount(inside & 0xFFFF, minlength=HALF)
    cum_low = low.cumsum(0)
    slot = int(torch.searchsorted(cum_low, k - below))
    below += int(cum_low[slot - 1]) if slot > 0 else 0
    value = torch.tensor([(bucket << 16) | slot], dtype=torch.int32).view(torch.float32).item()
    return value, below


def keep_top(scores: dict[str, torch.Tensor], n_prune: int) -> dict[str, torch.Tensor]:
    """Masks that prune exactly the `n_prune` lowest scores across all tensors jointly."""
    if n_prune == 0:
        return {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}
    names = sorted(scores)
    threshold, below = kth_smallest([scores[n] for n in names], n_prune)
    ties_to_prune = n_prune - below
    masks = {}
    for name in names:
        score = scores[name]
        keep = score > threshold
        tied = (score == threshold).reshape(-1)
        if ties_to_prune > 0 and tied.any():
            rank = tied.cumsum(0)
            keep.view(-1)[tied & (rank > ties_to_prune)] = True
            ties_to_prune -= min(ties_to_prune, int(rank[-1]))
        else:
            keep.view(-1)[tied] = True
        masks[name] = keep
    return masks


def masks_for_sparsity(scores: dict[str, torch.Tensor], sparsity: float,
                       scope: str = "global") -> dict[str, torch.Tensor]:
    """Prune round(sparsity * n) weights: over all tensors jointly, per tensor, or per row."""
    return masks_for_targets(scores, {name: sparsity for name in scores}, scope)


def masks_for_targets(scores: dict[str, torch.Tensor], targets: dict[str, float],
                      scope: str = "global") -> dict[str, torch.Tensor]:
    """Masks for a target sparsity per tensor (see sparsity_targets).

    global: tensors that share a target are selected jointly, pruning round(target * n) of
    their n weights together, so {mlp: 0.6, attention: 0.4} lets each module type spread its
    budget across layers. per_layer: round(target * numel) per tensor. per_row: round(target *
    row length) in every output row, the rows of a tensor being its first dimension.
    """
    if scope not in SCOPES:
        raise ValueError(f"masks.scope: got {scope!r}; allowed: {', '.join(map(repr, SCOPES))}")
    unmatched = sorted(set(targets) ^ set(scores))
    if unmatched:
        raise ValueError(f"{unmatched[0]}: has a score or a sparsity target but not both")
    for name, score in scores.items():
        check_scores(name, score)
    if scope == "per_row":
        return {name: keep_top_per_row(s, targets[name]) for name, s in scores.items()}
    if scope == "per_layer":
        return {name: keep_top({name: s}, round(targets[name] * s.numel()))[name]
                for name, s in scores.items()}
    masks = {}
    for target in sorted(set(targets.values())):
        group = {name: s for name, s in scores.items() if targets[name] == target}
        masks.update(keep_top(group, round(target * sum(s.numel() for s in group.values()))))
    return {name: masks[name] for name in scores}


def keep_top_per_row(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the round(sparsity * row length) lowest scores of every row, ties by position.

    Rows are short, so a stable sort within each row is cheap; rows go through in chunks to
    bound the sort's index memory.
    """
    shape = (score.shape[0], math.prod(score.shape[1:])) if score.dim() > 1 else (1, score.numel())
    rows = score.reshape(shape)
    n_prune = round(sparsity * rows.shape[1])
    keep = torch.ones(rows.shape, dtype=torch.bool, device=score.device)
    step = max(1, CHUNK // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        lowest = torch.sort(rows[start:start + step], dim=1, stable=True).indices[:, :n_prune]
        keep[start:start + step].scatter_(1, lowest, False)
    return keep.view(score.shape)


def masks_for_n_m(scores: dict[str, torch.Tensor], n: int, m: int) -> dict[str, torch.Tensor]:
    """N:M semi-structured masks: of every m consecutive weights along the input dimension
    (the last one), keep the n highest; ties prune the earlier position first."""
    if not 0 < n < m:
        raise ValueError(f"masks.n_m: need 0 < n < m, got {n}:{m}")
    masks = {}
    for name, score in scores.items():
        check_scores(name, score)
        if score.dim() == 0 or score.shape[-1] % m != 0:
            raise ValueError(f"{name}: input dimension of shape {tuple(score.shape)} is not a "
                             f"multiple of m={m}; exclude it or choose another N:M pattern")
        groups = score.reshape(-1, m)
        lowest = torch.sort(groups, dim=1, stable=True).indices[:, :m - n]
        keep = torch.ones(groups.shape, dtype=torch.bool, device=score.device)
        masks[name] = keep.scatter_(1, lowest, False).view(score.shape)
    return masks


def sparsity_targets(names: Iterable[str], default: float,
                     overrides: dict[str, float] | None = None,
                     exclude: Iterable[str] = ()) -> dict[str, float]:
    """A target sparsity per tensor name from fnmatch patterns.

    A name matching any `exclude` pattern gets 0.0 (kept dense); otherwise the first pattern in
    `overrides` (in insertion order, as written in params.yaml) that matches it gives its
    target; an unmatched name gets `default`.
    """
    overrides = overrides or {}
    exclude = tuple(exclude)
    targets = {}
    for name in names:
        if any(fnmatchcase(name, pattern) for pattern in exclude):
            targets[name] = 0.0
            continue
        targets[name] = next((target for pattern, target in overrides.items()
                              if fnmatchcase(name, pattern)), default)
    return targets


def masks_for_threshold(scores: dict[str, torch.Tensor], tau: float) -> dict[str, torch.Tensor]:
    """The seed's rule: keep a weight where its score exceeds tau."""
    for name, score in scores.items():
        check_scores(name, score)
    return {name: score > tau for name, score in scores.items()}


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights of `model` in place; mask names are Linear module names. A
    sharded weight (FSDP) is masked shard by shard."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            weight = modules[name].weight
            if weight.shape != mask.shape:
                raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, weight has "
                                 f"{tuple(weight.shape)}; the masks belong to another model")
            weight.mul_(like_parameter(mask.to(weight.dtype), weight))


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Eight mask entries per byte, most significant bit first (numpy.packbits order)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=mask.device)
    return (flat * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8, device=packed.device)
    bits = (packed.view(-1, 1) >> shifts) & 1
    numel = 1
    for d in shape:
        numel *= d
    return bits.reshape(-1)[:numel].view(shape).bool()


def save_masks(path: str | Path, masks: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    shapes = {name: list(mask.shape) for name, mask in sorted(masks.items())}
    # One metadata key only: safetensors writes several keys in a random order, which would
    # break bit-identical reruns.
    save_file({name: pack_mask(mask).cpu() for name, mask in masks.items()}, str(path),
              metadata={"gradprune.mask_shapes": json.dumps(shapes)})


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: masks missing; run the masks stage")
    try:
        with safe_open(str(path), framework="pt") as f:
            # A safetensors file saved without metadata gives None here, not {}.
            shapes = json.loads((f.metadata() or {})["gradprune.mask_shapes"])
            return {name: unpack_mask(f.get_tensor(name), tuple(shapes[name]))
                    for name in f.keys()}
    # RuntimeError: packed bytes too few for the recorded shape.
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError, RuntimeError) as err:
        raise ValueError(f"{path}: corrupt mask file ({err}); rerun the masks stage") from None


def sparsity_report(masks: dict[str, torch.Tensor]) -> dict:
    layers = [{"name": name, "numel": m.numel(), "kept": int(m.sum()),
               "sparsity": 1 - int(m.sum()) / m.numel()} for name, m in masks.items()]
    total = sum(layer["numel"] for layer in layers)
    kept = sum(layer["kept"] for layer in layers)
    return {"total": {"numel": total, "kept": kept, "sparsity": 1 - kept / total},
            "layers": layers}
