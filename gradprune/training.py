"""One training loop for the dense model and for masked fine-tuning.

AdamW, linear warmup then cosine decay, gradient clipping, bf16 autocast, periodic validation.
With masks, pruned weights stay exactly zero: their gradients are zeroed before the step and
the weights are re-masked after it (AdamW's decoupled weight decay and its moment estimates
could otherwise move them).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from gradprune.config import TrainParams
from gradprune.masks import apply_masks

log = logging.getLogger(__name__)


def lr_at(step: int, cfg: TrainParams) -> float:
    """Learning rate for optimizer step `step` (0-based): warmup to cfg.lr, cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def batch_order(n_blocks: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """Block indices for every step: seeded reshuffles of the data, one epoch after another."""
    g = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    epochs = [torch.randperm(n_blocks, generator=g) for _ in range(-(-needed // n_blocks))]
    return torch.cat(epochs)[:needed].view(steps, batch_size)


@torch.no_grad()
def mean_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int, bf16: bool) -> float:
    """Mean next-token cross-entropy over all predicted tokens of `blocks`."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start:start + batch_size]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=batch).logits
        loss = nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
            reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
    return total / count


@dataclass
class CurvePoint:
    step: int
    train_loss: float
    val_loss: float | None
    lr: float


def train_lm(model: nn.Module, train_blocks: torch.Tensor, val_blocks: torch.Tensor,
             cfg: TrainParams, seed: int, bf16: bool,
             masks: dict[str, torch.Tensor] | None = None,
             validate_also_at: set[int] = frozenset(),
             on_validation: Callable[[int, float], None] | None = None) -> list[CurvePoint]:
    """Train in place for cfg.steps; validate every cfg.eval_every steps, at the steps in
    `validate_also_at` and after the last.

    `on_validation(step, val_loss)` is called after each validation (steps count from 1), which
    is where fine-tuning saves its checkpoints.
    """
    params = dict(model.named_parameters())
    masked = {params[f"{name}.weight"]: mask for name, mask in (masks or {}).items()}
    if masks:
        apply_masks(model, masks)
    decay = [p for n, p in params.items() if p.ndim >= 2]
    no_decay = [p for n, p in params.items() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    order = batch_order(len(train_blocks), cfg.batch_size, cfg.steps, seed)
    val = val_blocks[: cfg.eval_blocks]
    curve: list[CurvePoint] = []
    started = time.perf_counter()
    for step in range(cfg.steps):
        model.train()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = train_blocks[order[step]]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step + 1}; lower the "
                                     "learning rate or check the data")
        loss.backward()
        for p, mask in masked.items():
            p.grad.mul_(mask)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if masked:
            with torch.no_grad():
                for p, mask in masked.items():
                    p.mul_(mask)
        done = step + 1
        val_loss = None
        if done % cfg.eval_every == 0 or done == cfg.steps or done in validate_also_at:
            val_loss = mean_loss(model, val, cfg.batch_size, bf16)
            tokens_per_s = done * batch.numel() / (time.perf_counter() - started)
            log.info("step %d/%d  train loss %.4f  val loss %.4f  lr %.2e  %.0f tokens/s",
                     done, cfg.steps, loss.item(), val_loss, lr, tokens_per_s)
            if on_validation is not None:
                on_validation(done, val_loss)
        curve.append(CurvePoint(done, loss.item(), val_loss, lr))
    return curve
