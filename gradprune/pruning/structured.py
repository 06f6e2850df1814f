"""Structured pruning of a `LlamaForCausalLM`: whole FFN channels and whole attention groups.

An FFN channel j is row j of gate_proj and up_proj and column j of down_proj. A KV group g is
KV head g (rows of k_proj and v_proj) together with the query heads that read it under
grouped-query attention (heads g*r .. g*r+r-1, r = heads / kv_heads: rows of q_proj and the
matching columns of o_proj). A group is the smallest unit of attention that can be removed:
zeroing a KV head while keeping its query heads is not a removal, since those heads would then
attend uniformly over zero keys and still write their value average through o_proj.

Structures are scored by summing the per-weight scores of the criteria (`gradprune.pruning.criteria`)
over their weights. For additive criteria (Taylor, Fisher/OBD) the sum is the estimate of the
loss change from removing the whole structure, under the same independence assumption the
per-weight criterion already makes; and since every structure of a kind holds the same number
of weights, ranking by sum or by mean is the same within a layer.

Every layer keeps the same number of FFN channels and the same number of KV groups, so the
smaller model is an ordinary LLaMA config that `from_pretrained` loads unchanged.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from gradprune.pruning.masks import check_scores

MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def mlp_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}"


def attn_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.self_attn.{proj}"


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _scores_for_layer(scores_by_module: dict[str, torch.Tensor],
                      names: list[str]) -> list[torch.Tensor]:
    missing = [n for n in names if n not in scores_by_module]
    if missing:
        raise ValueError(f"no scores for {missing}; structured pruning needs every attention and "
                         "MLP projection of every layer (check gradients.include/exclude)")
    for name in names:
        check_scores(name, scores_by_module[name])
    # float64 so that summing thousands of float32 scores does not reorder close structures.
    return [scores_by_module[n].double() for n in names]


def ffn_channel_scores(scores_by_module: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """One score per FFN channel of `layer`: its gate and up rows plus its down column."""
    gate, up, down = _scores_for_layer(scores_by_module, [mlp_name(layer, p) for p in MLP_PROJ])
    return gate.sum(dim=1) + up.sum(dim=1) + down.sum(dim=0)


def head_group_scores(scores_by_module: dict[str, torch.Tensor], layer: int,
                      num_key_value_heads: int) -> torch.Tensor:
    """One score per KV group of `layer`: its k and v rows, its query heads' q rows and the
    o_proj columns those query heads write to."""
    q, k, v, o = _scores_for_layer(scores_by_module, [attn_name(layer, p) for p in ATTN_PROJ])
    groups = num_key_value_heads
    # Query heads of one group are contiguous in q_proj's rows and o_proj's columns.
    return (q.reshape(groups, -1).sum(dim=1) + k.reshape(groups, -1).sum(dim=1)
            + v.reshape(groups, -1).sum(dim=1)
            + o.reshape(o.shape[0], groups, -1).sum(dim=(0, 2)))


def round_half_up(x: float) -> int:
    # Python's round() sends halves to even, so 2.5 and 3.5 would round in opposite
    # directions; half-up is easier to predict from params.
    return math.floor(x + 0.5)


def loadable_group_counts(config) -> list[int]:
    """KV group counts whose query heads divide the hidden size: transformers' LlamaConfig
    refuses any other head count on save and load, even with head_dim given explicitly."""
    per_group = config.num_attention_heads // config.num_key_value_heads
    return [g for g in range(1, config.num_key_value_heads + 1)
            if config.hidden_size % (g * per_group) == 0]


def uniform_widths(config, ffn_sparsity: float, head_sparsity: float,
                   ffn_multiple: int) -> tuple[int, int]:
    """Kept FFN width and kept KV groups per layer for target structured sparsities.

    The FFN width is rounded to the nearest multiple of `ffn_multiple` (matrix kernels run
    fastest on aligned widths), never below one multiple and never above the dense width.
    The group count is the loadable one nearest the target, the larger on a tie, and at least
    one: a layer without attention is another architecture.
    """
    if not (0 <= ffn_sparsity < 1 and 0 <= head_sparsity < 1):
        raise ValueError(f"structured sparsities must be in [0, 1), got ffn {ffn_sparsity}, "
                         f"heads {head_sparsity}")
    if ffn_multiple < 1:
        raise ValueError(f"ffn_multiple must be at least 1, got {ffn_multiple}")
    ffn = config.intermediate_size
    kept_ffn = round_half_up((1 - ffn_sparsity) * ffn / ffn_multiple) * ffn_multiple
    kept_ffn = min(ffn, max(ffn_multiple, kept_ffn))
    target = (1 - head_sparsity) * config.num_key_value_heads
    kept_groups = min(loadable_group_counts(config), key=lambda g: (abs(g - target), -g))
    return kept_ffn, kept_groups


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, ascending; ties go to the lower index."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k].sort().values


def select_structures(scores_by_module: dict[str, torch.Tensor], config, ffn_sparsity: float,
                      head_sparsity: float, ffn_multiple: int
                      ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """The FFN channels and KV groups each layer keeps, uniform widths across layers."""
    kept_ffn, kept_groups = uniform_widths(config, ffn_sparsity, head_sparsity, ffn_multiple)
    layers = range(config.num_hidden_layers)
    keep_ffn = {i: top_indices(ffn_channel_scores(scores_by_module, i), kept_ffn)
                for i in layers}
    keep_groups = {i: top_indices(head_group_scores(scores_by_module, i,
                                                    config.num_key_value_heads), kept_groups)
                   for i in layers}
    return keep_ffn, keep_groups


def _uniform_count(keep: dict[int, torch.Tensor], size: int, layers: int, what: str) -> int:
    if sorted(keep) != list(range(layers)):
        raise ValueError(f"{what}: need kept indices for layers 0..{layers - 1}, "
                         f"got {sorted(keep)}")
    counts = {len(idx) for idx in keep.values()}
    if len(counts) != 1:
        raise ValueError(f"{what}: every layer must keep the same number (one width in the "
                         f"config), got {sorted(counts)}")
    for layer, idx in keep.items():
        if idx.numel() == 0 or len(set(idx.tolist())) != idx.numel() \
                or not 0 <= int(idx.min()) <= int(idx.max()) < size:
            raise ValueError(f"{what} of layer {layer}: need distinct indices in [0, {size}), "
                             f"at least one, got {idx.tolist()}")
    return counts.pop()


def kept_slices(config, keep_ffn: torch.Tensor, keep_groups: torch.Tensor
                ) -> dict[str, tuple[int, torch.Tensor]]:
    """For one layer: projection -> (weight dim, kept indices along it)."""
    head_dim = head_dim_of(config)
    per_group = config.num_attention_heads // config.num_key_value_heads
    groups = keep_groups.sort().values
    heads = (groups[:, None] * per_group + torch.arange(per_group, device=groups.device)).reshape(-1)
    q_rows = (heads[:, None] * head_dim + torch.arange(head_dim, device=groups.device)).reshape(-1)
    kv_rows = (groups[:, None] * head_dim + torch.arange(head_dim, device=groups.device)).reshape(-1)
    channels = keep_ffn.sort().values
    return {"q_proj": (0, q_rows), "k_proj": (0, kv_rows), "v_proj": (0, kv_rows),
            "o_proj": (1, q_rows), "gate_proj": (0, channels), "up_proj": (0, channels),
            "down_proj": (1, channels)}


def _module_name(layer: int, proj: str) -> str:
    return attn_name(layer, proj) if proj in ATTN_PROJ else mlp_name(layer, proj)


def smaller_config(config, kept_ffn: int, kept_groups: int):
    new = copy.deepcopy(config)
    per_group = config.num_attention_heads // config.num_key_value_heads
    # head_dim stays explicit: hidden / heads no longer gives it once heads are removed.
    new.head_dim = head_dim_of(config)
    new.intermediate_size = kept_ffn
    new.num_attention_heads = kept_groups * per_group
    new.num_key_value_heads = kept_groups
    return new


def shrink_llama(model: nn.Module, keep_ffn: dict[int, torch.Tensor],
                 keep_groups: dict[int, torch.Tensor]) -> nn.Module:
    """A new, physically smaller model holding only the kept FFN channels and KV groups.

    Kept indices are used in ascending order, so the result does not depend on their order.
    """
    config = model.config
    layers = config.num_hidden_layers
    kept_ffn = _uniform_count(keep_ffn, config.intermediate_size, layers, "keep_ffn")
    kept_groups = _uniform_count(keep_groups, config.num_key_value_heads, layers, "keep_groups")
    if kept_groups not in loadable_group_counts(config):
        raise ValueError(f"keeping {kept_groups} KV groups gives a head count that does not "
                         f"divide hidden size {config.hidden_size}, which from_pretrained "
                         f"refuses; loadable counts: {loadable_group_counts(config)}")
    state = dict(model.state_dict())
    for layer in range(layers):
        for proj, (dim, idx) in kept_slices(config, keep_ffn[layer], keep_groups[layer]).items():
            prefix = _module_name(layer, proj)
            state[f"{prefix}.weight"] = state[f"{prefix}.weight"].index_select(dim, idx)
            # A bias belongs to the output rows: sliced with them, whole when columns go.
            if dim == 0 and f"{prefix}.bias" in state:
                state[f"{prefix}.bias"] = state[f"{prefix}.bias"].index_select(0, idx)
    param = next(model.parameters())
    smaller = type(model)(smaller_config(config, kept_ffn, kept_groups))
    smaller.load_state_dict(state, strict=True)
    return smaller.to(device=param.device, dtype=param.dtype).eval()


def structured_masks(model: nn.Module, keep_ffn: dict[int, torch.Tensor],
                     keep_groups: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Element masks on the full-size model that compute what `shrink_llama` computes.

    Zeroed o_proj columns silence the removed query heads and zeroed down_proj columns the
    removed channels; the q/k/v and gate/up rows are zeroed too so that the masked model holds
    exactly the weights the smaller one keeps.
    """
    config = model.config
    layers = config.num_hidden_layers
    _uniform_count(keep_ffn, config.intermediate_size, layers, "keep_ffn")
    _uniform_count(keep_groups, config.num_key_value_heads, layers, "keep_groups")
    modules = dict(model.named_modules())
    masks = {}
    for layer in range(layers):
        for proj, (dim, idx) in kept_slices(config, keep_ffn[layer], keep_groups[layer]).items():
            name = _module_name(layer, proj)
            mask = torch.zeros(modules[name].weight.shape, dtype=torch.bool,
                               device=modules[name].weight.device)
            masks[name] = mask.index_fill_(dim, idx, True)
    return dict(sorted(masks.items()))


def shape_report(model: nn.Module) -> dict:
    config = model.config
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "head_dim": head_dim_of(config), "ffn": config.intermediate_size,
            "vocab": config.vocab_size,
            # parameters() yields a tied embedding once.
            "parameters": sum(p.numel() for p in model.parameters())}
