"""Peak memory of the gradient pass: the pass before the lean one against the lean one, as ratios.

Contestants, each in a fresh child process (its peak resident set is its own, `ru_maxrss`), on
the same model and the same random token blocks (what the tokens are does not change memory):

* bare: per block forward + backward with gradients only for the prunable Linear weights, the
  gradients dropped after each block; no hooks, no accumulators (the floor).
* full: the pass as it was before the lean one: the whole backward leaves every prunable
  weight's gradient alive, then all five statistics (E[g], E|g|, E[g^2], ||X_j||, X^T X) are
  folded into fp32 accumulators.
* lean: `collect_gradient_stats` with the statistics gradients.statistics asks for (auto: what
  masks.criterion and compare.criteria read), each gradient folded and freed as backward
  finishes it.
* lean_checkpointed: the same with activation checkpointing.

Ratios: full / lean of the peak resident set, and of the peak above the loaded model (what
the pass itself adds). On a GPU (--device cuda) the peaks are torch's max_memory_allocated.

    python benchmarks/gradient_memory.py [--model smollm2|params] [--params params.yaml]
        [--blocks 2] [--block-size 256] [--device cpu] [--out benchmarks/results/gradient_memory.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from gradprune.config import load_params  # noqa: E402
from gradprune.device import bf16_autocast, model_device, resolve_device  # noqa: E402
from gradprune.io import write_json  # noqa: E402
from gradprune.models.llama import bf16_enabled, build_llama, prunable_linears  # noqa: E402
from gradprune.pruning.stats import STATISTICS, collect_gradient_stats, requested_statistics  # noqa: E402

MODES = ("bare", "full", "lean", "lean_checkpointed")


def train_only_the_prunable_weights(model: nn.Module, linears: dict[str, nn.Linear]) -> None:
    """What both baseline passes backpropagate into: the prunable Linears' weights alone."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in linears.values():
        layer.weight.requires_grad_(True)


def full_backward_stats(model: nn.Module, linears: dict[str, nn.Linear], blocks: torch.Tensor,
                        bf16: bool) -> None:
    """The gradient pass before the lean one: all five statistics, every gradient alive at once."""
    device = model_device(model)
    train_only_the_prunable_weights(model, linears)
    sums = {n: {k: torch.zeros_like(m.weight, dtype=torch.float32) for k in STATISTICS[:3]}
            for n, m in linears.items()}
    act = {n: torch.zeros(m.in_features, device=device) for n, m in linears.items()}
    xtx = {n: torch.zeros(m.in_features, m.in_features, device=device)
           for n, m in linears.items()}

    def record(name):
        def hook(module, inputs):
            x = inputs[0].detach().float().reshape(-1, module.in_features)
            act[name] += x.square().sum(0)
            xtx[name].addmm_(x.T, x)
        return hook

    def fold(name: str, m: nn.Linear) -> None:
        g = m.weight.grad.float()
        sums[name]["grad_mean"] += g
        sums[name]["grad_abs_mean"] += g.abs()
        sums[name]["grad_sq_mean"] += g.square()

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in linears.items()]
    backward_each_block(model, linears, blocks, bf16, fold)
    for h in hooks:
        h.remove()


def bare_pass(model: nn.Module, linears: dict[str, nn.Linear], blocks: torch.Tensor,
              bf16: bool) -> None:
    train_only_the_prunable_weights(model, linears)
    backward_each_block(model, linears, blocks, bf16, lambda name, m: None)


def backward_each_block(model: nn.Module, linears: dict[str, nn.Linear], blocks: torch.Tensor,
                        bf16: bool, fold) -> None:
    """Forward and backward of each block alone; then `fold(name, linear)` reads each prunable
    weight's gradient, which is dropped before the next block."""
    device = model_device(model)
    model.eval()
    for block in blocks:
        batch = block.unsqueeze(0).to(device)
        with bf16_autocast(device, bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        for name, m in linears.items():
            fold(name, m)
            m.weight.grad = None


def load(args, params, device):
    if args.model == "smollm2":
        from gradprune.models.sources import load_source_model

        return load_source_model("smollm2", device)[0]
    return build_llama(params.model, params.data.vocab_size, args.block_size, 0,
                       params.seed).to(device)


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args) -> dict:
    params = load_params(args.params)
    device = resolve_device(args.device)
    model = load(args, params, device)
    linears = prunable_linears(model, params.gradients.include, params.gradients.exclude)
    vocab = model.get_input_embeddings().num_embeddings
    blocks = torch.randint(0, vocab, (args.blocks, args.block_size),
                           generator=torch.Generator().manual_seed(params.seed))
    bf16 = bf16_enabled(params.gradients.bf16, device)
    statistics = requested_statistics(params)
    loaded = peak_bytes(device)
    started = time.perf_counter()
    if args.child == "bare":
        bare_pass(model, linears, blocks, bf16)
    elif args.child == "full":
        full_backward_stats(model, linears, blocks, bf16)
    else:
        collect_gradient_stats(model, linears, blocks, bf16, statistics,
                               checkpointing=args.child == "lean_checkpointed")
    return {"mode": args.child, "peak_bytes": peak_bytes(device), "loaded_bytes": loaded,
            "seconds": round(time.perf_counter() - started, 2),
            "statistics": list(STATISTICS) if args.child == "full" else
            [] if args.child == "bare" else list(statistics),
            "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "bf16": bf16, "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("smollm2", "params"), default="params",
                        help="the packaged SmolLM2-135M, or params.yaml's model section")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/gradient_memory.json")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    runs = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--child", mode, "--model", args.model, "--params",
               args.params, "--blocks", str(args.blocks), "--block-size", str(args.block_size),
               "--device", args.device]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        r = runs[mode]
        print(f"{mode:<18} peak {r['peak_bytes'] / 2**20:9.1f} MiB  above model "
              f"{(r['peak_bytes'] - r['loaded_bytes']) / 2**20:9.1f} MiB  {r['seconds']} s",
              flush=True)

    def above(mode):
        return runs[mode]["peak_bytes"] - runs[mode]["loaded_bytes"]

    result = {
        "benchmark": "gradient_memory", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": args.model, "device": args.device, "blocks": args.blocks,
        "block_size": args.block_size, "runs": runs,
        "peak_ratio_full_over_lean": round(runs["full"]["peak_bytes"]
                                           / runs["lean"]["peak_bytes"], 3),
        "added_ratio_full_over_lean": round(above("full") / max(above("lean"), 1), 3),
        "added_ratio_full_over_lean_checkpointed": round(
            above("full") / max(above("lean_checkpointed"), 1), 3),
        "peak_ratio_lean_over_bare": round(runs["lean"]["peak_bytes"]
                                           / runs["bare"]["peak_bytes"], 3),
    }
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if "ratio" in k}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
