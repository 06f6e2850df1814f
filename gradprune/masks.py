"""Masks from scores: a threshold tau, or an exact target sparsity; bit-packed storage.

A mask is a bool tensor shaped like its weight, True where the weight is kept.

Exact selection without sorting: scores are non-negative float32, whose IEEE-754 bit patterns
read as int32 sort in the same order as the values. A two-pass radix select counts the high 16
bits of every score into a 65,536-bin histogram, finds the bin holding the k-th smallest score,
then histograms the low 16 bits of that bin's members. Memory is two histograms plus one
chunk's temporaries, whatever the number of scores; ties at the threshold are broken by
position (tensors in name order, then flat index), so the pruned count is exactly k.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

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
    high = torch.zeros(HALF, dtype=torch.int64)
    for bits in _chunks(scores):
        high += torch.bincount(bits >> 16, minlength=HALF)
    cum = high.cumsum(0)
    bucket = int(torch.searchsorted(cum, k))
    below = int(cum[bucket - 1]) if bucket > 0 else 0
    low = torch.zeros(HALF, dtype=torch.int64)
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
    """Prune round(sparsity * n) weights: over all tensors jointly, or within each tensor."""
    for name, score in scores.items():
        check_scores(name, score)
    if scope == "global":
        total = sum(s.numel() for s in scores.values())
        return keep_top(scores, round(sparsity * total))
    if scope == "per_layer":
        return {name: keep_top({name: s}, round(sparsity * s.numel()))[name]
                for name, s in scores.items()}
    raise ValueError(f"masks.scope: got {scope!r}; allowed: 'global', 'per_layer'")


def masks_for_threshold(scores: dict[str, torch.Tensor], tau: float) -> dict[str, torch.Tensor]:
    """The seed's rule: keep a weight where its score exceeds tau."""
    for name, score in scores.items():
        check_scores(name, score)
    return {name: score > tau for name, score in scores.items()}


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights of `model` in place; mask names are Linear module names."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            weight = modules[name].weight
            if weight.shape != mask.shape:
                raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, weight has "
                                 f"{tuple(weight.shape)}; the masks belong to another model")
            weight.mul_(mask.to(weight.dtype))


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Eight mask entries per byte, most significant bit first (numpy.packbits order)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (flat * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
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
    save_file({name: pack_mask(mask) for name, mask in masks.items()}, str(path),
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
