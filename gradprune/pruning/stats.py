"""Per-weight gradient statistics and per-input-channel activation norms on calibration data.

One backward pass per calibration block. For every prunable weight W the accumulators hold
sum g, sum |g| and sum g^2 over blocks (fp32, whatever the compute dtype), and for every
prunable Linear the sum of squared inputs per input channel over all tokens, and optionally
(for SparseGPT) the sum of input outer products X^T X. Memory is the model, its gradients and
these accumulators: nothing grows with the number of blocks.

Under torch.distributed each process takes its share of the blocks and the sums are added
across processes before dividing, so the statistics equal one process's up to the order of
floating-point additions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gradprune.progress import progress_bar
from gradprune.training.parallel import all_reduce_sum, share


def collect_gradient_stats(model: nn.Module, linears: dict[str, nn.Linear], blocks: torch.Tensor,
                           bf16: bool, hessian: bool = False,
                           ) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    """Statistics per Linear name, and the mean calibration loss.

    grad_mean is E[g] over blocks, which is the gradient of the mean calibration loss because
    every block has the same number of predicted tokens (an LM block's length - 1; a seq2seq
    span-corruption example's target length, which is fixed). act_norm is the L2 norm of each input
    channel over all calibration tokens (Wanda's ||X_j||). With hessian=True, "hessian" is
    X^T X / n_tokens, in_features x in_features in fp32: the layer-wise reconstruction Hessian
    SparseGPT needs, up to a constant factor that its relative damping makes irrelevant. It is
    taken from the dense model in one pass, not layer by layer from already-pruned inputs as
    the SparseGPT reference does.
    """
    if len(blocks) == 0:
        raise ValueError("no calibration blocks")
    model.eval()  # no dropout; gradients still flow
    # Restored afterwards, so a caller's frozen parameters stay frozen.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in linears.values():
        layer.weight.requires_grad_(True)
    sums = {name: {k: torch.zeros_like(layer.weight, dtype=torch.float32)
                   for k in ("grad_mean", "grad_abs_mean", "grad_sq_mean")}
            for name, layer in linears.items()}
    act_sq = {name: torch.zeros(layer.in_features, dtype=torch.float32)
              for name, layer in linears.items()}
    xtx = {name: torch.zeros(layer.in_features, layer.in_features, dtype=torch.float32)
           for name, layer in linears.items()} if hessian else {}
    tokens = dict.fromkeys(linears, 0)

    def recorder(name):
        def hook(module, inputs):
            x = inputs[0].detach().float()
            x = x.reshape(-1, x.shape[-1])
            act_sq[name] += x.square().sum(dim=0)
            tokens[name] += x.shape[0]
            if hessian:
                xtx[name].addmm_(x.T, x)
        return hook

    handles = [layer.register_forward_pre_hook(recorder(name)) for name, layer in linears.items()]
    total_loss = 0.0
    try:
        for block in progress_bar(share(blocks), desc="calibration blocks"):
            batch = block.unsqueeze(0)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=batch, labels=batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"calibration loss is {loss.item()}; the model is broken")
            loss.backward()
            total_loss += loss.item()
            for name, layer in linears.items():
                g = layer.weight.grad.float()
                acc = sums[name]
                acc["grad_mean"] += g
                acc["grad_abs_mean"] += g.abs()
                acc["grad_sq_mean"] += g.square()
                layer.weight.grad = None
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    # Counts travel as float64, which holds the token counts and the loss sum exactly.
    counts = torch.tensor([total_loss, *tokens.values()], dtype=torch.float64)
    all_reduce_sum([t for per in sums.values() for t in per.values()]
                   + list(act_sq.values()) + list(xtx.values()) + [counts])
    total_loss = counts[0].item()
    tokens = dict(zip(tokens, (int(c) for c in counts[1:].tolist())))
    n = len(blocks)
    stats = {}
    for name in linears:
        stats[name] = {k: v / n for k, v in sums[name].items()}
        stats[name]["act_norm"] = act_sq[name].sqrt()
        if hessian:
            stats[name]["hessian"] = xtx[name] / tokens[name]
    return stats, total_loss / n


def save_stats(path: str | Path, stats: dict[str, dict[str, torch.Tensor]],
               info: dict) -> None:
    import json

    from safetensors.torch import save_file

    flat = {f"{name}.{k}": v.contiguous() for name, per in stats.items() for k, v in per.items()}
    # One metadata key only: safetensors writes several keys in a random order.
    save_file(flat, str(path), metadata={"gradprune.stats": json.dumps(info, sort_keys=True)})


def load_stats(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: gradient statistics missing; run the gradients stage")
    try:
        flat = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: corrupt statistics ({err}); rerun the gradients stage") from None
    stats: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        name, stat = key.rsplit(".", 1)
        stats.setdefault(name, {})[stat] = value
    return dict(sorted(stats.items()))


def load_stats_info(path: str | Path) -> dict:
    """What save_stats recorded beside the tensors (e.g. calibration_blocks, which gblm needs)."""
    import json

    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: gradient statistics missing; run the gradients stage")
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["gradprune.stats"])
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as err:
        raise ValueError(f"{path}: corrupt statistics ({err}); rerun the gradients stage") from None
