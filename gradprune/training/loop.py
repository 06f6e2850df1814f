"""One training loop for the dense model and for masked fine-tuning.

AdamW, linear warmup then cosine decay, gradient clipping, bf16 autocast, gradient
accumulation, periodic validation, optional early stopping, knowledge distillation and an
exponential moving average of the weights.

With masks, pruned weights stay exactly zero: their gradients are zeroed before the step and
the weights are re-masked after it (AdamW's decoupled weight decay and its moment estimates
could otherwise move them).

Given a state folder, the loop saves everything it needs to continue (weights, AdamW moments,
RNG, moving average, curve, early-stopping counters) at every validation, and resumes from the
newest complete save: a run killed at any point and rerun ends bit-identical to one that was
never interrupted. The step counter is the data position and the schedule position, since the
batch order and the learning rate are pure functions of it.

Under torch.distributed every process takes its share of each micro-batch, weights its loss by
that share's size and the gradients are summed across processes before clipping: the step is
the single-process step up to the order of floating-point additions, and every process holds
the same weights after it. Validation runs whole in every process; only the main process saves
resumable state.

A model sharded with FSDP (parallel.shard_model) trains the same way: FSDP sums the gradients
into each process's shard, the masks are split as the weights are, and every process steps its
own shard. Each process saves and resumes its own shard of the state (with the same number of
processes).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradprune.config import TrainParams
from gradprune.device import bf16_autocast, model_device
from gradprune.io import atomic_dir, atomic_file, reading, remove_stale_temporaries
from gradprune.models.llama import summed_loss
from gradprune.progress import progress_bar
from gradprune.pruning.masks import apply_masks
from gradprune.training.parallel import (
    all_reduce_gradients,
    all_reduce_sum,
    barrier,
    is_main_process,
    is_sharded,
    like_parameter,
    local_shard,
    rank_and_size,
    sharded_like,
    share,
)

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
    """Mean next-token cross-entropy over all predicted tokens of `blocks` (model.summed_loss)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        loss, tokens = summed_loss(model, blocks[start:start + batch_size], bf16)
        total += loss.item()
        count += tokens
    return total / count


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over token positions.

    The T^2 keeps the gradient's scale independent of T (Hinton et al., 2015).
    """
    vocab = student_logits.shape[-1]
    student = nn.functional.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, -1)
    teacher = nn.functional.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, -1)
    kl = nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return kl * temperature ** 2


@dataclass(frozen=True)
class Distillation:
    """Learn from a frozen teacher as well as from the data."""

    teacher: nn.Module
    temperature: float
    weight: float

    def mix(self, lm_loss: torch.Tensor, kd_loss: torch.Tensor) -> torch.Tensor:
        return (1 - self.weight) * lm_loss + self.weight * kd_loss


class MovingAverage:
    """Exponential moving average of every parameter, in fp32, updated after each step.

    train_lm starts it from the (masked) weights training starts from. Pruned weights are zero
    then and after every step, so their average stays exactly zero: ema + (1 - decay) * (0 - ema)
    with ema = 0.
    """

    def __init__(self, decay: float):
        self.decay = decay
        self.weights: dict[str, torch.Tensor] = {}

    def start(self, model: nn.Module) -> None:
        self.weights = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            self.weights[name].lerp_(p.detach().float(), 1 - self.decay)


def adamw(model: nn.Module, cfg: TrainParams) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms' gains or biases)."""
    params = list(model.parameters())
    return torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95))


@dataclass
class CurvePoint:
    step: int
    train_loss: float            # the LM loss, comparable with and without distillation
    val_loss: float | None
    lr: float
    kd_loss: float | None = None


@dataclass
class _Progress:
    """What the loop carries from step to step beyond the model and optimizer."""

    step: int = 0
    curve: list[CurvePoint] | None = None
    best_val_loss: float | None = None
    validations_since_best: int = 0
    stopped_early: bool = False


def train_lm(model: nn.Module, train_blocks: torch.Tensor, val_blocks: torch.Tensor,
             cfg: TrainParams, seed: int, bf16: bool,
             masks: dict[str, torch.Tensor] | None = None,
             validate_also_at: set[int] = frozenset(),
             on_validation: Callable[[int, float], None] | None = None, *,
             grad_accum: int = 1, patience: int | None = None,
             distillation: Distillation | None = None, ema: MovingAverage | None = None,
             state_dir: Path | None = None) -> list[CurvePoint]:
    """Train in place for cfg.steps optimizer steps of `grad_accum` micro-batches of
    cfg.batch_size blocks; validate every cfg.eval_every steps, at the steps in
    `validate_also_at` and after the last.

    `on_validation(step, val_loss)` is called after each validation (steps count from 1), which
    is where fine-tuning saves its checkpoints; the resumable state in `state_dir` is saved right
    after it, so a resumed run never skips a checkpoint. With `patience`, training stops once
    that many validations in a row brought no lower validation loss.
    """
    sharded = is_sharded(model)
    params = dict(model.named_parameters())
    device = model_device(model)
    masked = {params[f"{name}.weight"]: like_parameter(mask, params[f"{name}.weight"])
              for name, mask in (masks or {}).items()}
    if masks:
        apply_masks(model, masks)
    optimizer = adamw(model, cfg)
    order = batch_order(len(train_blocks), cfg.batch_size, cfg.steps * grad_accum, seed)
    order = order.view(cfg.steps, grad_accum, cfg.batch_size)
    val = val_blocks[: cfg.eval_blocks]

    progress = _Progress(curve=[])
    if state_dir is not None:
        progress = load_train_state(state_dir, model, optimizer, ema) or progress
    if progress.step == 0:
        torch.manual_seed(seed)
        if ema is not None:
            ema.start(model)
    if distillation is not None:
        distillation.teacher.eval()
    curve = progress.curve
    started, first = time.perf_counter(), progress.step
    for step in progress_bar(range(progress.step, cfg.steps), desc="optimizer steps"):
        if progress.stopped_early:
            break
        model.train()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        lm_total, kd_total = 0.0, 0.0
        for indices in order[step]:
            mine = share(indices)
            # This process's part of the micro-batch's mean loss (1 in one process).
            weight = len(mine) / len(indices)
            lm_loss, kd_loss = _micro_batch_losses(model, train_blocks[mine].to(device), bf16,
                                                   distillation, step, mine, state_dir,
                                                   cfg.loss_chunk)
            loss = lm_loss if kd_loss is None else distillation.mix(lm_loss, kd_loss)
            (loss * weight / grad_accum).backward()
            lm_total += lm_loss.item() * weight / grad_accum
            if kd_loss is not None:
                kd_total += kd_loss.item() * weight / grad_accum
        if not sharded:  # FSDP has summed them into each process's shard
            all_reduce_gradients(model)
        lm_total, kd_total = _sum_over_processes(lm_total, kd_total)
        for p, mask in masked.items():
            p.grad.mul_(mask)
        norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if sharded:  # the norm over every shard, replicated on every process
            norm = norm.full_tensor()
        if not torch.isfinite(norm):
            raise FloatingPointError(_divergence("gradient norm", norm.item(), step,
                                                 order[step].reshape(-1), state_dir))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if masked:
            with torch.no_grad():
                for p, mask in masked.items():
                    p.mul_(mask)
        if ema is not None:
            ema.update(model)
        done = step + 1
        val_loss = None
        if done % cfg.eval_every == 0 or done == cfg.steps or done in validate_also_at:
            val_loss = mean_loss(model, val, cfg.batch_size, bf16)
            tokens_per_s = ((done - first) * order[step].numel() * train_blocks.shape[1]
                            / (time.perf_counter() - started))
            log.info("step %d/%d  train loss %.4f  val loss %.4f  lr %.2e  %.0f tokens/s",
                     done, cfg.steps, lm_total, val_loss, lr, tokens_per_s)
            _track_early_stopping(progress, val_loss, patience, done)
        curve.append(CurvePoint(done, lm_total, val_loss, lr,
                                kd_total if distillation is not None else None))
        progress.step = done
        if val_loss is not None:
            if on_validation is not None:
                on_validation(done, val_loss)
            if state_dir is not None and (sharded or is_main_process()):
                save_train_state(state_dir, progress, model, optimizer, ema)
    return curve


def _sum_over_processes(*values: float) -> tuple[float, ...]:
    """Python floats summed over processes; unchanged in one process."""
    packed = torch.tensor(values, dtype=torch.float64)
    all_reduce_sum([packed])
    return tuple(packed.tolist())


def chunked_lm_loss(model: nn.Module, batch: torch.Tensor, chunk: int, bf16: bool
                    ) -> torch.Tensor:
    """Mean next-token cross-entropy of a Hugging Face causal LM over `chunk` positions at a
    time: each chunk's logits over the vocabulary (bf16, their fp32 copy, the log-softmax and
    their gradients, 16 bytes a vocabulary entry) exist only while that chunk is computed, in
    forward and again in backward, instead of the whole batch's at once."""
    with bf16_autocast(batch.device, bf16):
        hidden = model.model(input_ids=batch).last_hidden_state[:, :-1]
    targets = batch[:, 1:]
    total = 0.0
    for start in range(0, targets.shape[1], chunk):
        total = total + checkpoint(_summed_chunk_loss, model.lm_head,
                                   hidden[:, start:start + chunk],
                                   targets[:, start:start + chunk], bf16, use_reentrant=False)
    return total / targets.numel()


def _summed_chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                       bf16: bool) -> torch.Tensor:
    with bf16_autocast(hidden.device, bf16):
        logits = head(hidden)
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                       targets.reshape(-1).long(), reduction="sum")


def _micro_batch_losses(model, batch, bf16, distillation, step, indices, state_dir,
                        loss_chunk=None):
    """The LM loss, and the distillation loss when distilling (which needs every position's
    logits, so it never chunks)."""
    if loss_chunk is not None and distillation is None and hasattr(model, "lm_head"):
        loss = chunked_lm_loss(model, batch, loss_chunk, bf16)
        if not torch.isfinite(loss):
            raise FloatingPointError(_divergence("loss", loss.item(), step, indices, state_dir))
        return loss, None
    with bf16_autocast(batch.device, bf16):
        out = model(input_ids=batch, labels=batch)
    if not torch.isfinite(out.loss):
        raise FloatingPointError(_divergence("loss", out.loss.item(), step, indices, state_dir))
    if distillation is None:
        return out.loss, None
    with torch.no_grad(), bf16_autocast(batch.device, bf16):
        teacher_logits = distillation.teacher(input_ids=batch).logits
    kd_loss = distillation_loss(out.logits, teacher_logits, distillation.temperature)
    if not torch.isfinite(kd_loss):
        raise FloatingPointError(_divergence("distillation loss", kd_loss.item(), step, indices,
                                             state_dir))
    return out.loss, kd_loss


def _divergence(what: str, value: float, step: int, indices: torch.Tensor,
                state_dir: Path | None) -> str:
    kept = ""
    if state_dir is not None and (saved := _newest_state(state_dir)) is not None:
        kept = f"; the last good state ({saved.name}) is kept in {state_dir}"
    return (f"{what} is {value} at step {step + 1}, batch of blocks {indices.tolist()}{kept}; "
            "lower the learning rate or check those blocks")


def _track_early_stopping(progress: _Progress, val_loss: float, patience: int | None,
                          step: int) -> None:
    if progress.best_val_loss is None or val_loss < progress.best_val_loss:
        progress.best_val_loss, progress.validations_since_best = val_loss, 0
        return
    progress.validations_since_best += 1
    if patience is not None and progress.validations_since_best >= patience:
        log.info("step %d: no lower validation loss in %d validations; stopping early",
                 step, patience)
        progress.stopped_early = True


# --- resumable state: safetensors for tensors, JSON for counters, never pickle --------------

def _newest_state(state_dir: Path) -> Path | None:
    """The newest complete save: its state.json is written last."""
    saves = sorted(p for p in Path(state_dir).glob("step-*") if (p / "state.json").is_file())
    return saves[-1] if saves else None


def save_train_state(state_dir: Path, progress: _Progress, model: nn.Module,
                     optimizer: torch.optim.Optimizer, ema: MovingAverage | None) -> None:
    """Write `state_dir/step-NNNNNN` whole (temporary folder, then rename), then delete the
    older saves: a kill at any moment leaves at least one complete save.

    A sharded model: every process writes its shard (shard-<rank>.safetensors) and, once all
    have, the main process writes state.json, which makes the save complete."""
    from safetensors.torch import save_file

    if is_sharded(model):
        # The root's weights stay gathered after a forward pass (validation's) until backward.
        model.reshard()
    optim = optimizer.state_dict()
    tensors = {f"model.{k}": local_shard(v.detach()).contiguous()
               for k, v in model.named_parameters()}
    tensors.update({f"optimizer.{index}.{k}": local_shard(v)
                    for index, entry in optim["state"].items() for k, v in entry.items()})
    if ema is not None:
        tensors.update({f"ema.{k}": local_shard(v) for k, v in ema.weights.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {**asdict(progress), "param_groups": optim["param_groups"]}
    state_dir = Path(state_dir)
    target = state_dir / f"step-{progress.step:06d}"
    if is_sharded(model):
        rank, processes = rank_and_size()
        with atomic_file(target / f"shard-{rank}.safetensors") as tmp:
            save_file(tensors, str(tmp))
        barrier()
        if is_main_process():
            with atomic_file(target / "state.json") as tmp:
                tmp.write_text(json.dumps({**meta, "processes": processes}, indent=1) + "\n")
    else:
        with atomic_dir(target) as tmp:
            save_file(tensors, str(tmp / "tensors.safetensors"))
            (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n")
    if is_main_process():
        for older in state_dir.glob("step-*"):
            if older != target:
                shutil.rmtree(older)
    if is_sharded(model):
        barrier()  # no process looks for saves while older ones are going


def load_train_state(state_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     ema: MovingAverage | None) -> _Progress | None:
    """Restore the newest complete save in `state_dir`, if any, into model, optimizer, moving
    average and the torch RNG; returns the loop's progress."""
    from safetensors.torch import load_file

    if is_main_process():  # the only writer of state_dir
        remove_stale_temporaries(state_dir)
    sharded = is_sharded(model)
    barrier()  # the main process's cleanup is done before any process looks
    saved = _newest_state(state_dir)
    if saved is None:
        return None
    rank, processes = rank_and_size()
    with reading(saved, "resume state"):
        meta = json.loads((saved / "state.json").read_text())
        saved_by = meta.pop("processes", 1)
        if sharded and saved_by != processes:
            raise ValueError(f"{saved} holds {saved_by} processes' shards, this launch has "
                             f"{processes}: launch as many, or delete {state_dir} to start over")
        file = saved / (f"shard-{rank}.safetensors" if sharded else "tensors.safetensors")
        tensors = load_file(str(file), device=str(model_device(model)))
    if sharded:
        model.reshard()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            local_shard(p).copy_(tensors[f"model.{name}"])
    in_order = [p for group in optimizer.param_groups for p in group["params"]]
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            moments.setdefault(int(index), {})[name] = sharded_like(in_order[int(index)], value)
    groups = [{**g, "betas": tuple(g["betas"])} for g in meta.pop("param_groups")]
    optimizer.load_state_dict({"state": moments, "param_groups": groups})
    if ema is not None:
        ema.weights = {k[len("ema."):]: sharded_like(params[k[len("ema."):]], v)
                       for k, v in tensors.items() if k.startswith("ema.")}
    torch.set_rng_state(tensors["rng.torch"])
    meta["curve"] = [CurvePoint(**p) for p in meta["curve"]]
    log.info("resuming from step %d (%s)", meta["step"], saved)
    return _Progress(**meta)
