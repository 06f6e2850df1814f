"""Per-weight gradient statistics and per-input-channel activation norms on calibration data.

One backward pass per calibration block. For every prunable weight W the accumulators hold
sum g, sum |g| and sum g^2 over blocks (fp32, whatever the compute dtype), and for every
prunable Linear the sum of squared inputs per input channel over all tokens, and optionally
(for SparseGPT) the sum of input outer products X^T X. Only the statistics asked for are
accumulated (`statistics_for` says which a set of criteria reads).

The pass is lean: each weight's gradient is folded into its accumulators by a
post-accumulate-grad hook the moment backward has finished it, and freed there, so at most one
prunable weight's gradient is alive at a time instead of all of them. With `checkpointing`,
each decoder layer's activations are recomputed in backward instead of kept (the input
recorders count every token once all the same); with `offload`, accumulators live in host
memory and each gradient is copied there to be folded (through one pinned staging buffer when
the model is on a GPU, so the copy runs at full speed and is complete before it is read).
Memory is the model, one gradient, the accumulators and the (checkpointed) activations:
nothing grows with the number of blocks. Linears that read one input tensor (a decoder layer's
q/k/v, gate/up) share its activation statistics, taken once per block.

Every sum is taken in the same order whatever the thread count: blocks in sequence, one fp32
gradient per block added whole into its accumulator (elementwise, no reduction split across
threads), so the statistics whose ranking decides masks do not move with the thread count.

Under torch.distributed each process takes its share of the blocks and the sums are added
across processes before dividing, so the statistics equal one process's up to the order of
floating-point additions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradprune.config import Params
from gradprune.config.schema import row_not_applicable, split_row_pattern
from gradprune.device import bf16_autocast, model_device
from gradprune.progress import progress_bar
from gradprune.pruning.criteria import statistics_for
from gradprune.training.parallel import all_reduce_sum, share

GRADIENT_STATISTICS = ("grad_mean", "grad_abs_mean", "grad_sq_mean")
ACTIVATION_STATISTICS = ("act_norm", "hessian")
STATISTICS = GRADIENT_STATISTICS + ACTIVATION_STATISTICS


def check_statistics(statistics: Iterable[str]) -> tuple[str, ...]:
    """The requested statistics in STATISTICS order; an unknown name is an error."""
    wanted = set(statistics)
    unknown = sorted(wanted - set(STATISTICS))
    if unknown:
        raise ValueError(f"unknown statistic {unknown[0]!r}; allowed: {', '.join(STATISTICS)}")
    return tuple(s for s in STATISTICS if s in wanted)


def requested_statistics(params: Params) -> tuple[str, ...]:
    """gradients.statistics resolved: every statistic, or those the masks criterion and the
    compare rows read (as compare rows take their variant: masks.variant for gradient and
    taylor, the plain form otherwise), less the activation statistics of the masks configs that
    calibrate layer by layer (masks.calibration; a row as its pattern resolves it, with the
    allocation of masks.*, so a row that OWL leaves uniform may keep statistics it does not
    read: harmless, never the reverse). act_norm stands in when none is
    read (magnitude, random): it is one forward's worth of work and names every prunable Linear
    in the file."""
    if params.gradients.statistics == "all":
        return STATISTICS
    masks = params.masks
    rows = [dataclasses.replace(masks, criterion=c, pattern=split_row_pattern(p, "compare")[0],
                                variant=masks.variant if c in ("gradient", "taylor") else "mean")
            for c in params.compare.criteria for p in params.compare.patterns
            if row_not_applicable(c, p) is None]
    needed = set()
    for cfg in [masks, *rows]:
        reads = statistics_for([(cfg.criterion, cfg.variant)])
        if cfg.layer_by_layer(params.model.arch):
            reads -= set(ACTIVATION_STATISTICS)  # the masks stage takes them layer by layer
        needed |= reads
    return tuple(s for s in STATISTICS if s in (needed or {"act_norm"}))


def collect_gradient_stats(model: nn.Module, linears: dict[str, nn.Linear], blocks: torch.Tensor,
                           bf16: bool, statistics: Iterable[str] = STATISTICS[:4], *,
                           checkpointing: bool = False, offload: bool = False,
                           ) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    """The requested statistics per Linear name, and the mean calibration loss.

    grad_mean is E[g] over blocks, which is the gradient of the mean calibration loss because
    every block has the same number of predicted tokens (an LM block's length - 1; a seq2seq
    span-corruption example's target length, which is fixed). grad_abs_mean is E|g|,
    grad_sq_mean E[g^2]. act_norm is the L2 norm of each input channel over all calibration
    tokens (Wanda's ||X_j||). "hessian" is X^T X / n_tokens, in_features x in_features in fp32:
    the layer-wise reconstruction Hessian SparseGPT needs, up to a constant factor that its
    relative damping makes irrelevant, taken from the dense model in one pass (see
    gradprune.pruning.sequential for the layer-by-layer form). Blocks move to the model's
    device; without any gradient statistic no backward runs.
    """
    if len(blocks) == 0:
        raise ValueError("no calibration blocks")
    statistics = check_statistics(statistics)
    gradients = [s for s in statistics if s in GRADIENT_STATISTICS]
    device = model_device(model)
    home = torch.device("cpu") if offload else device

    def accumulator(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float32, device=home)

    staging = torch.empty(max(m.weight.numel() for m in linears.values()), dtype=torch.float32,
                          pin_memory=True) if offload and gradients and device.type == "cuda" \
        else None
    sums = {name: {k: accumulator(*layer.weight.shape) for k in gradients}
            for name, layer in linears.items()}
    act_sq = {name: accumulator(layer.in_features) for name, layer in linears.items()
              if "act_norm" in statistics}
    xtx = {name: accumulator(layer.in_features, layer.in_features)
           for name, layer in linears.items() if "hessian" in statistics}
    tokens = dict.fromkeys(linears, 0)
    # A Linear records its input once per block: a checkpointed layer runs forward again in
    # backward, and that second call must not count its tokens twice.
    recorded: set[str] = set()
    # Linears called one after another on the same input tensor (q/k/v, gate/up) share their
    # activation accumulators from the first block on: every block adds the same sums to them,
    # so the statistics are taken once per input, with the bits they would have anyway. Only the
    # last input is held (a reference to every one would keep all layers' activations alive
    # under checkpointing).
    last_input: list = [None, -1, ""]  # tensor, its version counter, the Linear that read it
    reads_like: dict[str, str] = {}  # Linear -> the Linear whose accumulators it shares

    buffers: dict[tuple, torch.Tensor] = {}

    def work_buffer(shape: torch.Size, on: torch.device, use: str) -> torch.Tensor:
        """An fp32 buffer of `shape` (tokens x in_features), one per use and width, reused
        from block to block: a fresh tensor per Linear and block can cost more on a CPU in
        page faults (malloc hands freed memory back to the OS and maps it again) than the
        arithmetic that fills it. A block of another length replaces it."""
        key = (use, shape[-1], on)
        if key not in buffers or buffers[key].shape != shape:
            buffers[key] = torch.empty(shape, dtype=torch.float32, device=on)
        return buffers[key]

    def recorder(name):
        def hook(module, inputs):
            if name in recorded:
                return
            recorded.add(name)
            given = inputs[0]
            x = given.detach()
            tokens[name] += x.numel() // x.shape[-1]
            same = last_input[0] is given and last_input[1] == given._version
            owner = last_input[2] if same else name
            if reads_like.setdefault(name, owner) != owner:
                raise RuntimeError(f"{name} read the input of {reads_like[name]} in the first "
                                   "calibration block but not in a later one; the statistics "
                                   "assume a fixed forward")
            if owner != name:  # the owner has added this block's sums already
                if act_sq:
                    act_sq[name] = act_sq[owner]
                if xtx:
                    xtx[name] = xtx[owner]
                return
            last_input[:] = [given, given._version, name]
            rows = x.reshape(-1, x.shape[-1])
            copied = rows.dtype != torch.float32
            if copied:  # a bf16 input: our own fp32 copy
                rows = work_buffer(rows.shape, rows.device, "input").copy_(rows)
            if xtx and offload:
                xtx[name] += (rows.T @ rows).to(home)
            elif xtx:
                xtx[name].addmm_(rows.T, rows)
            if act_sq:  # the model's own input is left alone; a copy is squared in place
                squares = rows if copied else work_buffer(rows.shape, rows.device, "squares")
                torch.mul(rows, rows, out=squares)
                act_sq[name] += squares.sum(dim=0).to(home)
        return hook

    def folder(name):
        acc = sums[name]

        def hook(weight):
            # Folded in the gradient's own dtype: a bf16 gradient is promoted to fp32 inside
            # each add (the sums equal those of an fp32 copy), without the copy.
            g = weight.grad
            if staging is not None:
                g = staging[:g.numel()].view_as(g).copy_(g)  # synchronous: complete on return
            elif g.device != home:
                g = g.to(home)
            if "grad_mean" in acc:
                acc["grad_mean"] += g
            if "grad_abs_mean" in acc:
                acc["grad_abs_mean"] += g.abs()
            if "grad_sq_mean" in acc:
                acc["grad_sq_mean"].addcmul_(g, g)
            weight.grad = None
        return hook

    model.eval()  # no dropout; gradients still flow
    # Restored afterwards, so a caller's frozen parameters stay frozen.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in linears.values():
        layer.weight.requires_grad_(bool(gradients))
    handles = []
    if act_sq or xtx:
        handles += [layer.register_forward_pre_hook(recorder(name))
                    for name, layer in linears.items()]
    if gradients:
        handles += [layer.weight.register_post_accumulate_grad_hook(folder(name))
                    for name, layer in linears.items()]
    total_loss = 0.0
    try:
        with checkpointed_layers(model, checkpointing and bool(gradients)), \
                torch.set_grad_enabled(bool(gradients)):
            for block in progress_bar(share(blocks), desc="calibration blocks"):
                recorded.clear()
                last_input[0] = None
                batch = block.unsqueeze(0).to(device)
                with bf16_autocast(device, bf16):
                    loss = model(input_ids=batch, labels=batch).loss
                if gradients:
                    loss.backward()
                loss_value = loss.item()  # the block's one host-device sync
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"calibration loss is {loss_value}; the model is "
                                             "broken")
                total_loss += loss_value
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    # Shared accumulators part again, so that every Linear's sums are reduced exactly once.
    for name, owner in reads_like.items():
        if owner != name:
            if act_sq:
                act_sq[name] = act_sq[owner].clone()
            if xtx:
                xtx[name] = xtx[owner].clone()
    # Counts travel as float64, which holds the token counts and the loss sum exactly.
    counts = torch.tensor([total_loss, *tokens.values()], dtype=torch.float64, device=home)
    all_reduce_sum([t for per in sums.values() for t in per.values()]
                   + list(act_sq.values()) + list(xtx.values()) + [counts])
    total_loss = counts[0].item()
    tokens = dict(zip(tokens, (int(c) for c in counts[1:].tolist())))
    n = len(blocks)
    stats = {}
    for name in linears:
        stats[name] = {k: v / n for k, v in sums[name].items()}
        if act_sq:
            stats[name]["act_norm"] = act_sq[name].sqrt()
        if xtx:
            stats[name]["hessian"] = xtx[name] / tokens[name]
    return stats, total_loss / n


@contextlib.contextmanager
def checkpointed_layers(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Activation checkpointing of every layer in the model's `layers` lists (the decoder
    layers of a LLaMA, both stacks of the seq2seq model): each keeps only its input and reruns
    its forward in backward. The layers' own forward methods are restored afterwards."""
    if not enabled:
        yield
        return
    layers = [layer for name, stack in model.named_modules()
              if name.rsplit(".", 1)[-1] == "layers" and isinstance(stack, nn.ModuleList)
              for layer in stack]
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the instance attribute; the class's forward shows again


def save_stats(path: str | Path, stats: dict[str, dict[str, torch.Tensor]],
               info: dict) -> None:
    import json

    from safetensors.torch import save_file

    flat = {f"{name}.{k}": v.contiguous() for name, per in stats.items() for k, v in per.items()}
    # One metadata key only: safetensors writes several keys in a random order.
    save_file(flat, str(path), metadata={"gradprune.stats": json.dumps(info, sort_keys=True)})


def load_stats(path: str | Path, device: torch.device | str | None = None,
               statistics: Iterable[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The statistics in `path` per Linear name, on `device` (None: the CPU). With
    `statistics`, only those are read from the file (it is memory-mapped): one criterion's
    masks never load another's buffers, such as SparseGPT's Hessians."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: gradient statistics missing; run the gradients stage")
    wanted = None if statistics is None else set(statistics)
    stats: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
            for key in f.keys():
                name, stat = key.rsplit(".", 1)
                per = stats.setdefault(name, {})
                if wanted is None or stat in wanted:
                    per[stat] = f.get_tensor(key)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: corrupt statistics ({err}); rerun the gradients stage") from None
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
