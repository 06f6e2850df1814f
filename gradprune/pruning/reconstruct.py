"""Block-wise reconstruction: after pruning, tune each decoder layer's kept weights (mask
fixed) so that the layer reproduces the dense layer's outputs on calibration activations.

No fine-tuning of the whole model: one decoder layer at a time, its Linear weights trained by
Adam on the mean squared error between its output and the dense target, every pruned weight
held at exactly zero (gradients masked before each step, weights re-masked after). Layer by
layer, the pruned model's inputs come through the layers already reconstructed, while the
targets come from the dense model's own path, so a layer also learns to undo what the layers
before it still get wrong.

`reconstruct_layer` is the unit (one dense layer, its pruned copy, masks, inputs);
`reconstruct_decoder` runs it over a LLaMA-style model's decoder layers (`model.model.layers`),
capturing the inputs of the first layer, and the keyword arguments the model passes its layers
(position embeddings, attention mask), with a forward pre-hook.
"""

from __future__ import annotations

import torch
from torch import nn


def layer_output(layer: nn.Module, hidden: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
    """A decoder layer's output hidden states (transformers 5 returns the tensor; older versions
    a tuple whose first element it is)."""
    out = layer(hidden, **layer_kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def layer_outputs(layer: nn.Module, inputs: torch.Tensor, layer_kwargs: dict, batch_size: int,
                  bf16: bool) -> torch.Tensor:
    """`layer` over every calibration sample of `inputs` (samples x tokens x hidden), fp32."""
    layer.eval()
    outs = []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start:start + batch_size]
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=bf16):
            outs.append(layer_output(layer, batch, layer_kwargs).float())
    return torch.cat(outs)


def relative_error(layer: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                   layer_kwargs: dict, batch_size: int, bf16: bool) -> float:
    """||layer(inputs) - targets||^2 / ||targets||^2 over all calibration samples."""
    outputs = layer_outputs(layer, inputs, layer_kwargs, batch_size, bf16)
    return ((outputs - targets).square().sum() / targets.square().sum()).item()


def reconstruct_layer(dense_layer: nn.Module, pruned_layer: nn.Module,
                      masks: dict[str, torch.Tensor], inputs: torch.Tensor, *,
                      targets: torch.Tensor | None = None, layer_kwargs: dict | None = None,
                      steps: int, lr: float, batch_size: int, bf16: bool, seed: int = 0) -> dict:
    """Tune `pruned_layer`'s Linear weights in place so that its outputs on `inputs` approach
    `targets` (by default `dense_layer`'s outputs on the same inputs).

    masks: keep-masks by Linear name relative to the layer ('mlp.up_proj'); a Linear without a
    mask (a structurally smaller layer's) is tuned whole. Norms and biases stay as they are.
    The samples are visited in a seeded order, `batch_size` per step. Returns the relative
    output error before and after (see `relative_error`) and the steps taken; should the
    tuning end with a higher error (too high a learning rate), the layer's weights are put back
    as they were and the record says so.
    """
    layer_kwargs = layer_kwargs or {}
    if targets is None:
        targets = layer_outputs(dense_layer, inputs, layer_kwargs, batch_size, bf16)
    if len(targets) != len(inputs):
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match inputs of shape "
                         f"{tuple(inputs.shape)}")
    linears = {name: m for name, m in pruned_layer.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(masks) - set(linears))
    if unknown:
        raise ValueError(f"mask for {unknown[0]}, which is no Linear of the pruned layer "
                         f"(its Linears: {', '.join(sorted(linears))})")
    before = relative_error(pruned_layer, inputs, targets, layer_kwargs, batch_size, bf16)
    if steps == 0:
        return {"error_before": before, "error_after": before, "steps": 0, "kept": False}

    flags = [(p, p.requires_grad) for p in pruned_layer.parameters()]
    for p in pruned_layer.parameters():
        p.requires_grad_(False)
    weights = {name: m.weight for name, m in linears.items()}
    keep = {weights[name]: mask.to(weights[name].device, weights[name].dtype)
            for name, mask in masks.items()}
    original = {name: w.detach().clone() for name, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(True)
    optimizer = torch.optim.Adam(list(weights.values()), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    while len(batches) < steps:  # epochs of seeded shuffles
        batches.extend(torch.randperm(len(inputs), generator=generator).split(batch_size))
    pruned_layer.train()
    try:
        for step, pick in enumerate(batches[:steps]):
            batch = inputs[pick]
            with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=bf16):
                output = layer_output(pruned_layer, batch, layer_kwargs)
            loss = nn.functional.mse_loss(output.float(), targets[pick])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"reconstruction loss is {loss.item()} at step "
                                         f"{step + 1}; lower masks.reconstruct.lr")
            loss.backward()
            for w, mask in keep.items():
                w.grad.mul_(mask)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # Adam leaves a weight whose gradient was always zero where it was; re-masking
            # makes "exactly zero" independent of that.
            with torch.no_grad():
                for w, mask in keep.items():
                    w.mul_(mask)
    finally:
        pruned_layer.eval()
        for p, flag in flags:
            p.requires_grad_(flag)
    after = relative_error(pruned_layer, inputs, targets, layer_kwargs, batch_size, bf16)
    if not after < before:
        with torch.no_grad():
            for name, w in weights.items():
                w.copy_(original[name])
        return {"error_before": before, "error_after": before, "steps": steps, "kept": False}
    return {"error_before": before, "error_after": after, "steps": steps, "kept": True}


class _Captured(Exception):
    """Stops the forward pass once the first decoder layer's inputs are recorded."""


@torch.no_grad()
def decoder_inputs(model: nn.Module, blocks: torch.Tensor, batch_size: int
                   ) -> tuple[torch.Tensor, dict]:
    """The hidden states entering the first decoder layer for every block (fp32), and the
    keyword arguments the model passes its decoder layers (position embeddings, attention
    mask), captured for one block: blocks of one length share them, and they broadcast over
    a batch."""
    first = model.model.layers[0]
    captured: dict = {}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured["hidden"] = hidden.float()
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    model.eval()
    hidden, layer_kwargs = [], {}
    try:
        for start in range(0, len(blocks), batch_size):
            try:
                model(input_ids=blocks[start:start + batch_size], use_cache=False)
            except _Captured:
                hidden.append(captured["hidden"])
        try:
            model(input_ids=blocks[:1], use_cache=False)
        except _Captured:
            layer_kwargs = captured["kwargs"]
    finally:
        handle.remove()
    return torch.cat(hidden), layer_kwargs


def reconstruct_decoder(dense: nn.Module, pruned: nn.Module, masks: dict[str, torch.Tensor],
                        blocks: torch.Tensor, *, steps: int, lr: float, batch_size: int,
                        bf16: bool, seed: int = 0) -> list[dict]:
    """`reconstruct_layer` for every decoder layer of `pruned` (in place), against `dense`.

    masks: keep-masks by full Linear name ('model.layers.3.mlp.up_proj'); empty for a
    structurally smaller model, whose layers are then tuned whole. Layer i learns to map the
    pruned model's inputs (through layers < i, already reconstructed) to the dense model's
    outputs of layer i. Returns one record per layer.
    """
    dense_layers, pruned_layers = dense.model.layers, pruned.model.layers
    if len(dense_layers) != len(pruned_layers):
        raise ValueError(f"the dense model has {len(dense_layers)} decoder layers, the pruned "
                         f"one {len(pruned_layers)}")
    dense_hidden, layer_kwargs = decoder_inputs(dense, blocks, batch_size)
    pruned_hidden = decoder_inputs(pruned, blocks, batch_size)[0]
    records = []
    for i, (dense_layer, pruned_layer) in enumerate(zip(dense_layers, pruned_layers)):
        prefix = f"model.layers.{i}."
        layer_masks = {name[len(prefix):]: mask for name, mask in masks.items()
                       if name.startswith(prefix)}
        targets = layer_outputs(dense_layer, dense_hidden, layer_kwargs, batch_size, bf16)
        record = reconstruct_layer(dense_layer, pruned_layer, layer_masks, pruned_hidden,
                                   targets=targets, layer_kwargs=layer_kwargs, steps=steps, lr=lr,
                                   batch_size=batch_size, bf16=bf16, seed=seed + i)
        records.append({"layer": i, **record})
        pruned_hidden = layer_outputs(pruned_layer, pruned_hidden, layer_kwargs, batch_size,
                                      bf16)
        dense_hidden = targets
    return records
