"""What every stage will need, before any weight is loaded: peak device memory, peak host memory
and bytes on disk, predicted from a LLaMA config.json and the params (`gradprune plan`).

The model is built on the meta device (shapes, no storage), so a 7B plan costs nothing. Each
prediction is a sum of named parts, the arrays a stage holds at its peak:

* weights: float32, as the stages load them (4 bytes a parameter);
* bf16 autocast copies of every Linear weight a forward pass uses, alive until backward;
* activations saved for backward, per token and decoder layer: the fp32 inputs of the two
  RMSNorms (4H each), their bf16 outputs (2H each), q, k and v after RoPE with k and v repeated
  to every head, the attention output and o_proj's input (2H each), the MLP's gate, up, SiLU
  and product (2F each): 22H + 8F bytes, H the hidden size and F the FFN width. With
  activation checkpointing a layer keeps only its fp32 input (4H) and one layer at a time
  holds the rest;
* logits over the vocabulary, per token: bf16 (2V), their fp32 copy for the loss (4V), its
  log-softmax (4V) and the gradient of each in backward (6V): 16V bytes;
* the gradient pass: one fp32 gradient at a time (the largest Linear's), and one fp32
  accumulator per statistic asked for (E[g], E|g|, E[g^2]: 4 bytes a prunable weight;
  ||X_j||: 4 a Linear input; X^T X: 4 in_features^2 a Linear), on the device or offloaded;
* fine-tuning: fp32 gradients (4), AdamW's two moments (8) and the moving average (4) for every
  parameter, the bool masks (1 a prunable weight), and with distillation the teacher's weights
  and logits. Under torchrun (`processes` N) each process takes 1/N of every batch; with
  finetune.sharding: fsdp each also holds 1/N of the weights, gradients, moments, moving average
  and teacher, plus what FSDP gathers whole: two decoder layers' weights and gradients (the one
  computing and the one prefetched) and the root's (embeddings, final norm, LM head), which
  stay gathered from forward to backward; rank 0 gathers each checkpoint in host memory;
* host memory: the stage process's runtime (RUNTIME_HOST_BYTES, measured on the development
  machine), plus what a stage keeps on the host (offloaded
  accumulators, averaging's float64 sum). On a CPU the device is the host: the two add up.

Predictions of peaks are checked against measured ones in benchmarks/plan_check.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gradprune.config import Params
from gradprune.models.llama import prunable_linears
from gradprune.pruning.stats import requested_statistics

# The host floor every stage stands on: a stage process with torch, transformers and MLflow
# imported and its MLflow run open peaks at about 600 MiB with a model of a few thousand
# weights (the micro DAG's, measured on the development machine).
RUNTIME_HOST_BYTES = 600 * 2**20
STAGES = ("train", "gradients", "masks", "finetune", "average", "evaluate")


@dataclass
class StageNeed:
    """Bytes per named part, on the device, on the host and on disk."""

    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    disk: dict[str, int] = field(default_factory=dict)

    def totals(self, on_cpu: bool) -> dict[str, int]:
        device = sum(self.device.values())
        host = sum(self.host.values()) + (device if on_cpu else 0)
        return {"device": 0 if on_cpu else device, "host": host, "disk": sum(self.disk.values())}


def read_llama_config(path: str | Path):
    """A LLaMA config.json as a transformers LlamaConfig; another model type is refused."""
    from transformers import LlamaConfig

    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; give a model folder or its config.json")
    raw = json.loads(path.read_text())
    if raw.get("model_type", "llama") != "llama":
        raise ValueError(f"{path}: model_type {raw['model_type']!r}; plan knows LLaMA models")
    return LlamaConfig(**raw)


def meta_model(config):
    """The model with shapes and no storage."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(config)


@dataclass(frozen=True)
class Shapes:
    parameters: int          # unique (tied weights once)
    linear_weights: int      # every Linear a forward uses (lm_head included)
    prunable: int
    largest_prunable: int
    prunable_inputs: int     # sum of in_features over prunable Linears
    prunable_inputs_sq: int  # sum of in_features^2
    largest_input_sq: int
    layer_parameters: int    # of one decoder layer
    layers: int
    hidden: int
    ffn: int
    vocab: int


def model_shapes(config, params: Params) -> Shapes:
    model = meta_model(config)
    unique = {id(p): p for p in model.parameters()}
    linears = prunable_linears(model, params.gradients.include, params.gradients.exclude)
    every_linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return Shapes(
        parameters=sum(p.numel() for p in unique.values()),
        linear_weights=sum(m.weight.numel() for m in every_linear),
        prunable=sum(m.weight.numel() for m in linears.values()),
        largest_prunable=max(m.weight.numel() for m in linears.values()),
        prunable_inputs=sum(m.in_features for m in linears.values()),
        prunable_inputs_sq=sum(m.in_features ** 2 for m in linears.values()),
        largest_input_sq=max(m.in_features ** 2 for m in linears.values()),
        layer_parameters=sum(p.numel() for p in model.model.layers[0].parameters()),
        layers=config.num_hidden_layers, hidden=config.hidden_size,
        ffn=config.intermediate_size, vocab=config.vocab_size)


def _activations(s: Shapes, tokens: int, checkpointing: bool) -> int:
    layer = (22 * s.hidden + 8 * s.ffn) * tokens
    if checkpointing:
        return s.layers * 4 * s.hidden * tokens + layer
    return s.layers * layer


def _logits(s: Shapes, tokens: int, backward: bool = True) -> int:
    return (16 if backward else 6) * s.vocab * tokens


def _statistics_bytes(s: Shapes, statistics: tuple[str, ...]) -> int:
    per = {"grad_mean": 4 * s.prunable, "grad_abs_mean": 4 * s.prunable,
           "grad_sq_mean": 4 * s.prunable, "act_norm": 4 * s.prunable_inputs,
           "hessian": 4 * s.prunable_inputs_sq}
    return sum(per[k] for k in statistics)


def plan_stages(config, params: Params, bf16: bool = True, processes: int = 1
                ) -> dict[str, StageNeed]:
    """Bytes per stage and part (see the module docstring), in the modes `params` chooses;
    fine-tuning per process of `processes` (torchrun's)."""
    s = model_shapes(config, params)
    block = params.data.block_size
    weights = 4 * s.parameters
    autocast = 2 * s.linear_weights if bf16 else 0
    runtime = {"runtime": RUNTIME_HOST_BYTES}
    model_file = 4 * s.parameters

    def training(cfg, extra: dict[str, int], batch: int | None = None,
                 shards: int = 1) -> dict[str, int]:
        batch = batch or cfg.batch_size
        tokens = batch * block
        # A chunked loss holds one chunk's logits (distillation always takes them whole).
        chunked = cfg.loss_chunk is not None and getattr(cfg, "distill_weight", 0) == 0
        return {"weights": weights // shards, "gradients": 4 * s.parameters // shards,
                "adamw_moments": 8 * s.parameters // shards, "autocast_copies": autocast,
                "activations": _activations(s, tokens, False),
                "logits": _logits(s, batch * min(cfg.loss_chunk, block) if chunked
                                  else tokens), **extra}

    plan = {}
    plan["train"] = StageNeed(device=training(params.train, {}) if params.train.steps else
                              {"weights": weights,
                               "logits": _logits(s, params.train.batch_size * block, False)},
                              host=runtime, disk={"model": model_file})

    g = params.gradients
    statistics = requested_statistics(params)
    backward = any(k.startswith("grad_") for k in statistics)
    accumulators = _statistics_bytes(s, statistics)
    gradient_device = {"weights": weights, "autocast_copies": autocast,
                       "activations": _activations(s, block, g.checkpointing and backward)
                       if backward else (22 * s.hidden + 8 * s.ffn) * block,
                       "logits": _logits(s, block, backward),
                       "one_gradient": 4 * s.largest_prunable if backward else 0}
    gradient_host = dict(runtime)
    (gradient_host if g.offload else gradient_device)["accumulators"] = accumulators
    plan["gradients"] = StageNeed(gradient_device, gradient_host,
                                  {"statistics": accumulators})

    m = params.masks
    read = _statistics_bytes(s, tuple(k for k in statistics
                                      if k in _read_by(m.criterion, m.variant)))
    masks_device = {"weights": weights, "statistics_read": read,
                    "scores": 0 if m.criterion == "sparsegpt" else 4 * s.prunable,
                    "masks": s.prunable}
    masks_disk = {"masks": s.prunable // 8}
    if m.criterion == "sparsegpt":
        # The rewritten weights of every Linear, and one Linear's Hessian work (damped copy,
        # Cholesky factor, inverse) at a time.
        masks_device["rewritten_weights"] = 4 * s.prunable
        masks_device["sparsegpt_working_set"] = 3 * 4 * s.largest_input_sq
        masks_disk["rewritten_weights"] = 4 * s.prunable
    masks_host = dict(runtime)
    if m.layer_by_layer(params.model.arch):
        # The model, its masks and rewritten weights stay in host memory; the device holds one
        # decoder layer, its statistics and scores, and the calibration hidden states in and
        # out of it.
        masks_host.update({k: masks_device.pop(k) for k in
                           ("weights", "masks", "rewritten_weights") if k in masks_device})
        masks_device = {
            "layer_weights": 4 * s.prunable // s.layers,
            "layer_scores": masks_device.pop("scores") // s.layers,
            "layer_statistics": 4 * (s.prunable_inputs_sq if m.criterion == "sparsegpt"
                                     else s.prunable_inputs) // s.layers,
            "calibration_states": 2 * 4 * s.hidden * block * g.calibration_blocks,
            **masks_device}
    plan["masks"] = StageNeed(masks_device, masks_host, masks_disk)

    f = params.finetune
    shards = processes if f.sharding == "fsdp" else 1
    batch = -(-f.batch_size // processes)  # the largest process's share of a batch
    extra = {"moving_average": 4 * s.parameters // shards, "masks": s.prunable}
    if shards > 1:
        root = s.parameters - s.layers * s.layer_parameters
        extra["gathered_layers"] = 2 * 8 * s.layer_parameters
        extra["gathered_root"] = 8 * root
    if f.distill_weight > 0:
        extra["teacher_weights"] = weights // shards
        extra["teacher_logits"] = 2 * s.vocab * batch * block
    saves = f.runs * (f.checkpoints + 1)  # checkpoints and each run's moving average
    finetune_host = dict(runtime)
    if shards > 1:
        finetune_host["gathered_checkpoint"] = 4 * s.parameters
    plan["finetune"] = StageNeed(training(f, extra, batch, shards), finetune_host,
                                 {"checkpoints": saves * model_file,
                                  "resume_state": 16 * s.parameters})  # over every shard

    plan["average"] = StageNeed(
        {"weights": weights, "logits": _logits(s, f.batch_size * block, False)},
        {**runtime, "float64_sum": 8 * s.parameters, "one_checkpoint": 4 * s.parameters},
        {"model": model_file, "sparse_export": model_file - 4 * s.prunable
         + s.prunable // 8 + int(4 * s.prunable * (1 - (m.sparsity or 0)))})

    e = params.evaluate
    context = e.context or block
    plan["evaluate"] = StageNeed({"weights": weights,
                                  "logits": _logits(s, e.batch_size * context, False)},
                                 dict(runtime), {"exports_scratch": 2 * model_file})
    return plan


def _read_by(criterion: str, variant: str) -> set[str]:
    from gradprune.pruning.criteria import statistics_for

    return statistics_for([(criterion, variant)])


def check_fits(stage: str, need: StageNeed, device: torch.device,
               available: int | None = None) -> None:
    """Stop before compute when the plan says the stage cannot fit: `available` bytes (default:
    the GPU's total memory; on a CPU the machine's physical memory). The message names the
    parts and the knobs that shrink them."""
    on_cpu = device.type != "cuda"
    if available is None:
        available = (_physical_memory() if on_cpu
                     else torch.cuda.get_device_properties(device).total_memory)
    totals = need.totals(on_cpu)
    wanted = totals["host" if on_cpu else "device"]
    if wanted <= available:
        return
    parts = need.device if not on_cpu else {**need.host, **need.device}
    biggest = ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in
                        sorted(parts.items(), key=lambda kv: -kv[1])[:4])
    raise ValueError(
        f"stage {stage}: the plan needs {wanted / 2**30:.1f} GiB of "
        f"{'host' if on_cpu else 'device'} memory but {device} has {available / 2**30:.1f} GiB "
        f"(largest parts: {biggest}); shrink it: gradients.checkpointing: true, "
        "gradients.offload: true, gradients.statistics: auto, smaller batch_size or "
        "data.block_size, or more GPUs (torchrun; for fine-tuning with finetune.sharding: "
        "fsdp); `gradprune plan` shows every part")


def check_stage_fits(stage: str, model_dir: Path, params: Params, device: torch.device,
                     bf16: bool = False, processes: int = 1) -> None:
    """check_fits for a stage about to load the LLaMA in `model_dir` (the seq2seq model, which
    plan does not model, is let through), in one of `processes` processes."""
    if params.model.arch != "llama":
        return
    plan = plan_stages(read_llama_config(model_dir), params, bf16, processes)
    check_fits(stage, plan[stage], device)


def _physical_memory() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_table(plan: dict[str, StageNeed], on_cpu: bool) -> list[dict]:
    """One row per stage: totals in bytes, and the parts on the device."""
    return [{"stage": name, **need.totals(on_cpu), "device_parts": need.device,
             "host_parts": need.host, "disk_parts": need.disk} for name, need in plan.items()]
