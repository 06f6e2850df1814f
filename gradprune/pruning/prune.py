"""From collected statistics to a pruned model, whatever the criterion and pattern.

`prune` returns what the masks stage stores: keep-masks over the full-size model's prunable
Linears (always), SparseGPT's rewritten kept weights (sparsegpt only), and for the structured
pattern the physically smaller model. `load_pruned_model` turns those files back into the model
fine-tuning starts from and the masks it must enforce.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gradprune.config import MaskParams, parse_pattern
from gradprune.device import model_device
from gradprune.io import reading
from gradprune.models.llama import bf16_enabled, load_model
from gradprune.pruning.allocation import owl_targets
from gradprune.pruning.criteria import scores_for, statistics_for
from gradprune.pruning.masks import (
    apply_masks,
    load_masks,
    masks_for_n_m,
    masks_for_targets,
    masks_for_threshold,
    save_masks,
    sparsity_report,
    sparsity_targets,
)
from gradprune.pruning.reconstruct import reconstruct_decoder
from gradprune.pruning.sparsegpt import sparsegpt_prune_layers
from gradprune.pruning.structured import (
    select_structures,
    shape_report,
    shrink_llama,
    structured_masks,
)

MASKS_FILE = "masks.safetensors"
WEIGHTS_FILE = "weights.safetensors"
SMALLER_MODEL = "model"


@dataclass
class Pruned:
    masks: dict[str, torch.Tensor]
    new_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    smaller: nn.Module | None = None
    # masks.allocation owl: per decoder layer its outlier ratio and the sparsity it was given.
    allocation: dict[str, dict[str, float]] = field(default_factory=dict)


def prune(model: nn.Module, stats: dict[str, dict[str, torch.Tensor]], cfg: MaskParams,
          seed: int, n_blocks: int) -> Pruned:
    """Prune the Linears named in `stats` as `cfg` says; `model` itself is left unchanged."""
    missing = sorted(statistics_for([(cfg.criterion, cfg.variant)])
                     - set(next(iter(stats.values()), {})))
    if missing:
        raise ValueError(f"the gradient statistics hold no {missing[0]}, which masks.criterion "
                         f"{cfg.criterion} (variant {cfg.variant}) reads; rerun the gradients "
                         "stage with gradients.statistics: auto (what masks.criterion and "
                         "compare.criteria read) or all")
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight.detach() for name in sorted(stats)}
    pattern = parse_pattern(cfg.pattern)
    targets = sparsity_targets(weights, cfg.sparsity or 0.0, cfg.overrides, cfg.exclude)
    allocation = {}
    if cfg.allocation == "owl":
        targets, allocation = owl_targets(weights, stats, targets, cfg.sparsity,
                                          cfg.owl.outlier_threshold, cfg.owl.max_deviation)
    n, m = pattern if isinstance(pattern, tuple) else (0, 0)

    if cfg.criterion == "sparsegpt":
        new_weights, masks = sparsegpt_prune_layers(
            weights, stats, targets, n=n, m=m, block_size=cfg.sparsegpt.block_size,
            damp=cfg.sparsegpt.damp)
        return Pruned(masks, new_weights, allocation=allocation)

    scores = scores_for(cfg.criterion, weights, stats, variant=cfg.variant,
                        gblm_alpha=cfg.gblm_alpha, n_blocks=n_blocks, seed=seed)
    if pattern == "structured":
        keep_ffn, keep_groups = select_structures(
            scores, model.config,
            _or(cfg.structured.ffn_sparsity, cfg.sparsity),
            _or(cfg.structured.head_sparsity, cfg.sparsity), cfg.structured.ffn_multiple)
        return Pruned(structured_masks(model, keep_ffn, keep_groups),
                      smaller=shrink_llama(model, keep_ffn, keep_groups))
    if n:
        pruned = {name: s for name, s in scores.items() if targets[name] > 0}
        masks = {**_all_kept(weights), **masks_for_n_m(pruned, n, m)}
    elif cfg.tau is not None:
        masks = masks_for_threshold(scores, cfg.tau)
        # Excluded Linears stay dense whatever their scores. `targets` cannot say which they
        # are here: without masks.sparsity every Linear's target is 0.
        excluded = sparsity_targets(weights, 1.0, exclude=cfg.exclude)
        masks.update({name: torch.ones_like(masks[name]) for name in weights
                      if excluded[name] == 0})
    else:
        masks = masks_for_targets(scores, targets, cfg.scope)
    return Pruned(masks, allocation=allocation)


def _or(value: float | None, default: float | None) -> float:
    return value if value is not None else (default or 0.0)


def _all_kept(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: torch.ones(w.shape, dtype=torch.bool, device=w.device)
            for name, w in weights.items()}


def apply_pruning(model: nn.Module, pruned: Pruned) -> nn.Module:
    """The pruned model: the smaller one, or `model` with new weights and masks applied."""
    if pruned.smaller is not None:
        return pruned.smaller
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in pruned.new_weights.items():
            modules[name].weight.copy_(weight)
    apply_masks(model, pruned.masks)
    return model


def reconstruct(dense: nn.Module, model: nn.Module, masks: dict[str, torch.Tensor],
                blocks: torch.Tensor, cfg: MaskParams, seed: int) -> dict:
    """Block-wise reconstruction of the pruned `model` (in place) against `dense` on the
    calibration `blocks`, as masks.reconstruct says; returns what it did per layer."""
    r = cfg.reconstruct
    started = time.perf_counter()
    layers = reconstruct_decoder(dense, model, masks, blocks, steps=r.steps, lr=r.lr,
                                 batch_size=r.batch_size, bf16=bf16_enabled(r.bf16, model_device(model)),
                                 seed=seed)
    return {"steps_per_layer": r.steps, "lr": r.lr, "batch_size": r.batch_size,
            "calibration_blocks": len(blocks), "seconds": time.perf_counter() - started,
            "mean_error_before": sum(x["error_before"] for x in layers) / len(layers),
            "mean_error_after": sum(x["error_after"] for x in layers) / len(layers),
            "layers": layers}


def reconstruct_pruned(dense: nn.Module, pruned: Pruned, blocks: torch.Tensor, cfg: MaskParams,
                       seed: int) -> dict:
    """`reconstruct` for what `prune` returned: the smaller model is tuned in place; otherwise
    the tuned weights of every masked Linear become `pruned.new_weights`. `dense` is left as
    it is."""
    if pruned.smaller is not None:
        return reconstruct(dense, pruned.smaller, {}, blocks, cfg, seed)
    model = apply_pruning(copy.deepcopy(dense), pruned)
    report = reconstruct(dense, model, pruned.masks, blocks, cfg, seed)
    modules = dict(model.named_modules())
    pruned.new_weights = {name: modules[name].weight.detach().clone() for name in pruned.masks}
    return report


def save_pruned(folder: Path, pruned: Pruned) -> None:
    from safetensors.torch import save_file

    save_masks(folder / MASKS_FILE, pruned.masks)
    if pruned.new_weights:
        save_file({k: v.contiguous() for k, v in pruned.new_weights.items()},
                  str(folder / WEIGHTS_FILE))
    if pruned.smaller is not None:
        pruned.smaller.save_pretrained(folder / SMALLER_MODEL)


def load_pruned_model(dense_dir: Path, masks_dir: Path, device: torch.device | None = None
                      ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model fine-tuning starts from, on `device` (None: the CPU), and the masks it must
    keep enforcing (in host memory; they move to the weights' device where applied).

    Structured pruning leaves a smaller dense model and nothing to enforce; otherwise the dense
    model gets SparseGPT's rewritten weights (if any) and its masks.
    """
    from safetensors.torch import load_file

    if (masks_dir / SMALLER_MODEL).is_dir():
        return load_model(masks_dir / SMALLER_MODEL, device), {}
    model = load_model(dense_dir, device)
    masks = load_masks(masks_dir / MASKS_FILE)
    new_weights = {}
    if (masks_dir / WEIGHTS_FILE).is_file():
        with reading(masks_dir / WEIGHTS_FILE, "rewritten weights"):
            new_weights = load_file(str(masks_dir / WEIGHTS_FILE),
                                    device=str(model_device(model)))
    return apply_pruning(model, Pruned(masks, new_weights)), masks


def prunable_sparsity(model: nn.Module, dense_shapes: dict[str, torch.Size]) -> float:
    """1 - non-zero prunable weights / the dense model's prunable weights (any pattern:
    a structurally smaller model counts its removed rows and columns as pruned)."""
    modules = dict(model.named_modules())
    total = sum(torch.Size(shape).numel() for shape in dense_shapes.values())
    nonzero = sum(int(torch.count_nonzero(modules[name].weight)) for name in dense_shapes)
    return 1 - nonzero / total


def pruning_report(pruned: Pruned, dense: nn.Module) -> dict:
    """Per-layer and total sparsity of the masks, and the new shape when structured."""
    report = sparsity_report(pruned.masks)
    if pruned.allocation:
        report["allocation"] = pruned.allocation
    if pruned.smaller is not None:
        report["shape_before"] = shape_report(dense)
        report["shape_after"] = shape_report(pruned.smaller)
    return report


def with_overrides(cfg: MaskParams, **changes) -> MaskParams:
    """A validated copy of `cfg` with some fields replaced (compare rows use this)."""
    new = dataclasses.replace(cfg, **changes)
    new.check()
    return new
