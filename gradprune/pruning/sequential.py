"""Layer-by-layer (sequential) calibration, as the SparseGPT and Wanda reference code prune.

The calibration blocks' hidden states enter the first decoder layer; the layer's prunable
Linears record their inputs (||X_j|| and X^T X, as the one-pass statistics do), the layer is
pruned from those statistics, and the hidden states are run through the *pruned* layer to
become the next layer's inputs. So every layer is pruned for the inputs it will really see
after the layers before it were pruned, and only one layer's working set (its weights, its
Hessians and the calibration hidden states) is needed at a time: the layer moves to `device`
for its turn and back afterwards, so the rest of the model may stay in host memory.

The first layer sees the same inputs in both modes, so its statistics and masks equal the
one-pass ones; the layers after it differ by what pruning the earlier layers changed.

`calibrate_layers` is the general loop (statistics in, a pruning callback per layer);
`prune_layer_by_layer` prunes with a masks config through it, one layer's Linears at a time by
gradprune.pruning.prune.prune; `prune_calibrated` chooses between it and the one-pass prune.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from gradprune.config import MaskParams
from gradprune.device import bf16_autocast, model_device
from gradprune.pruning.criteria import statistics_for
from gradprune.pruning.prune import Pruned, apply_pruning, prune
from gradprune.pruning.stats import ACTIVATION_STATISTICS


def statistics_to_load(cfg: MaskParams, arch: str) -> set[str]:
    """What pruning with `cfg` reads from the gradients stage's file: all its criterion reads,
    less the activation statistics that layer-by-layer calibration takes itself."""
    reads = statistics_for([(cfg.criterion, cfg.variant)])
    return reads - set(ACTIVATION_STATISTICS) if cfg.layer_by_layer(arch) else reads


class _Captured(Exception):
    """Raised by the first layer's pre-hook once it holds the layer's inputs."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face LLaMA (model.model.layers)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError("masks.calibration: sequential needs a LLaMA-layout model "
                         "(model.model.layers); use one_pass for this model")
    return layers


def first_layer_inputs(model: nn.Module, blocks: torch.Tensor
                       ) -> tuple[list[torch.Tensor], dict]:
    """The hidden states each calibration block brings to the first decoder layer, and the
    keyword arguments the model passes every layer (position embeddings, attention mask),
    which are the same for blocks of equal length."""
    layers = decoder_layers(model)
    states, kwargs = [], {}

    def catch(module, args, kw):
        states.append((args[0] if args else kw["hidden_states"]).detach())
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    device = model_device(model)
    try:
        with torch.no_grad():
            for block in blocks:
                try:
                    model(input_ids=block.unsqueeze(0).to(device), use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return states, kwargs


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


@torch.no_grad()
def calibrate_layers(model: nn.Module, blocks: torch.Tensor, linears: dict[str, nn.Linear],
                     prune_layer: Callable[[dict[str, dict[str, torch.Tensor]]], None],
                     statistics: tuple[str, ...] = ACTIVATION_STATISTICS, *, bf16: bool = False,
                     device: torch.device | None = None) -> None:
    """For each decoder layer in turn: record `statistics` (act_norm, hessian) of its Linears in
    `linears` over every block's hidden states, call `prune_layer(stats)` (which prunes those
    Linears in place), then run the hidden states through the pruned layer for the next one.

    stats are per Linear name, fp32, in the units of gradprune.pruning.stats: act_norm the L2
    norm of each input channel over all tokens, hessian X^T X / tokens. A layer none of whose
    Linears is in `linears` is only run through.
    """
    unknown = sorted(set(statistics) - set(ACTIVATION_STATISTICS))
    if unknown:
        raise ValueError(f"layer-by-layer calibration takes activation statistics only, not "
                         f"{unknown[0]}")
    layers = decoder_layers(model)
    home = model_device(model)
    device = device or home
    states, kwargs = first_layer_inputs(model, blocks)
    kwargs = _to(kwargs, device)
    states = [s.to(device) for s in states]
    prefix = {id(layer): f"model.layers.{i}." for i, layer in enumerate(layers)}
    for layer in layers:
        mine = {name: linears[name] for name in linears if name.startswith(prefix[id(layer)])}
        layer.to(device)
        if mine:
            prune_layer(_layer_statistics(layer, mine, states, kwargs, statistics, bf16))
        with bf16_autocast(device, bf16):
            states = [_output(layer(s, **kwargs)) for s in states]
        layer.to(home)


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _layer_statistics(layer: nn.Module, linears: dict[str, nn.Linear], states, kwargs,
                      statistics: tuple[str, ...], bf16: bool) -> dict[str, dict[str, torch.Tensor]]:
    device = states[0].device
    act_sq = {n: torch.zeros(m.in_features, device=device) for n, m in linears.items()}
    xtx = {n: torch.zeros(m.in_features, m.in_features, device=device)
           for n, m in linears.items()} if "hessian" in statistics else {}
    tokens = dict.fromkeys(linears, 0)

    def recorder(name):
        def hook(module, inputs):
            x = inputs[0].detach().float().reshape(-1, module.in_features)
            act_sq[name] += x.square().sum(dim=0)
            tokens[name] += x.shape[0]
            if xtx:
                xtx[name].addmm_(x.T, x)
        return hook

    handles = [m.register_forward_pre_hook(recorder(n)) for n, m in linears.items()]
    try:
        with bf16_autocast(device, bf16):
            for s in states:
                layer(s, **kwargs)
    finally:
        for h in handles:
            h.remove()
    stats = {}
    for name in linears:
        stats[name] = {}
        if "act_norm" in statistics:
            stats[name]["act_norm"] = act_sq[name].sqrt()
        if xtx:
            stats[name]["hessian"] = xtx[name] / tokens[name]
    return stats


def prune_layer_by_layer(model: nn.Module, blocks: torch.Tensor,
                         stats: dict[str, dict[str, torch.Tensor]], cfg: MaskParams, seed: int,
                         n_blocks: int, *, bf16: bool = False,
                         device: torch.device | None = None) -> Pruned:
    """Prune the Linears named in `stats` layer by layer as `cfg` says, each layer from the
    activation statistics of its pruned predecessors' outputs (plus whatever `stats` holds,
    such as gblm's E[g^2]). `model` ends pruned (new weights and masks applied)."""
    needed = ("hessian",) if cfg.criterion == "sparsegpt" else ("act_norm",)
    linears = {name: module for name, module in model.named_modules() if name in stats}
    home = model_device(model)
    masks, new_weights = {}, {}

    def prune_layer(layer_stats):
        merged = {name: {**stats[name], **per} for name, per in layer_stats.items()}
        pruned = prune(model, merged, cfg, seed, n_blocks)
        apply_pruning(model, pruned)
        masks.update({k: v.to(home) for k, v in pruned.masks.items()})
        new_weights.update({k: v.to(home) for k, v in pruned.new_weights.items()})

    calibrate_layers(model, blocks, linears, prune_layer, needed, bf16=bf16, device=device)
    return Pruned(dict(sorted(masks.items())), dict(sorted(new_weights.items())))


def prune_calibrated(model: nn.Module, stats: dict[str, dict[str, torch.Tensor]],
                     cfg: MaskParams, seed: int, n_blocks: int, blocks: torch.Tensor | None, *,
                     arch: str, bf16: bool = False, device: torch.device | None = None
                     ) -> Pruned:
    """masks.calibration as configured: layer by layer for the activation criteria when asked
    (`blocks` are then the calibration blocks, each layer computes on `device` while the model
    may stay in host memory, and `model` ends pruned), else the one-pass prune from the
    collected statistics (`model` unchanged)."""
    if cfg.layer_by_layer(arch):
        if blocks is None:
            raise ValueError("masks.calibration: sequential needs the calibration blocks")
        return prune_layer_by_layer(model, blocks, stats, cfg, seed, n_blocks, bf16=bf16,
                                    device=device)
    return prune(model, stats, cfg, seed, n_blocks)
