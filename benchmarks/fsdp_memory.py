"""Per-process memory of masked fine-tuning under torchrun, replicated (finetune.sharding: none,
the data-parallel mode) against sharded (fsdp), as ratios, beside `gradprune plan`'s prediction.

Each setting is one `torchrun --standalone --nproc-per-node N` launch of this file: every
process builds the same randomly initialised LLaMA (--layers, --hidden, --ffn, --vocab), masks
half of each decoder Linear, shards it or not, and runs `train_lm` for --steps AdamW steps with
a moving average on --batch blocks of --block-size random tokens (its share of them). It reports
the bytes of training state it holds (its weights, gradients, AdamW moments and moving average,
counted tensor by tensor: this process's shards when sharded) and its peak resident set. Small
batches on purpose: the training state, which sharding divides, is what is measured.

Peak resident sets are measured twice: with glibc's default malloc, which keeps the buffers
FSDP gathers layer by layer in its heap once freed (its mmap threshold grows with them), and
with MALLOC_MMAP_THRESHOLD_=65536, which returns every freed buffer over 64 KiB to the system,
so the resident set follows what the process really holds.

    python benchmarks/fsdp_memory.py [--processes 2] [--out benchmarks/results/fsdp_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from gradprune.config import FinetuneParams, ModelParams, params_from_dict
from gradprune.io import write_json
from gradprune.models.llama import build_llama, prunable_linears
from gradprune.plan import plan_stages
from gradprune.training.loop import MovingAverage, _local, train_lm
from gradprune.training.parallel import (
    init_process_group_from_env,
    rank_and_size,
    shard_model,
    shutdown_process_group,
)

STATE_PARTS = ("weights", "gradients", "adamw_moments", "moving_average")
ALLOCATORS = {"glibc_default": {}, "mmap_threshold_64k": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def _bytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors if t is not None)


def child(args) -> None:
    init_process_group_from_env()
    torch.set_num_threads(1)
    rank, _ = rank_and_size()
    model = build_llama(
        ModelParams(layers=args.layers, hidden=args.hidden, heads=8, kv_heads=4, ffn=args.ffn),
        args.vocab,
        args.block_size,
        0,
        seed=0,
    )
    g = torch.Generator().manual_seed(1)
    masks = {
        name: torch.rand(layer.weight.shape, generator=g) < 0.5
        for name, layer in prunable_linears(model, ("model.layers.*",)).items()
    }
    blocks = torch.randint(0, args.vocab, (args.batch * args.steps, args.block_size), generator=g)
    if args.child == "fsdp":
        shard_model(model)
    cfg = FinetuneParams(
        steps=args.steps,
        batch_size=args.batch,
        warmup_steps=1,
        eval_every=args.steps,
        eval_blocks=1,
        bf16="off",
    )
    ema = MovingAverage(0.9)
    held = {}

    def after_step(optimizer, *_):
        # Right after a step, before the loop frees the gradients: what this process holds.
        params = [p for group in optimizer.param_groups for p in group["params"]]
        held.update(
            weights=_bytes(params),
            gradients=_bytes(p.grad for p in params),
            adamw_moments=_bytes(
                v for state in optimizer.state.values() for v in state.values() if v.ndim > 0
            ),
        )

    register_optimizer_step_post_hook(after_step)
    started = time.perf_counter()
    train_lm(model, blocks, blocks[:1], cfg, seed=0, bf16=False, masks=masks, ema=ema)
    held["moving_average"] = _bytes(ema.weights.values())
    Path(args.child_out, f"rank-{rank}.json").write_text(
        json.dumps(
            {
                **held,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    )
    shutdown_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/fsdp_memory.json")
    parser.add_argument("--child", choices=("none", "fsdp"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0

    shape = [
        f"--{k}={getattr(args, k.replace('-', '_'))}"
        for k in ("layers", "hidden", "ffn", "vocab", "block-size", "batch", "steps")
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    runs = {}
    for sharding in ("none", "fsdp"):
        ranks, peaks = [], {}
        for allocator, extra_env in ALLOCATORS.items():
            with tempfile.TemporaryDirectory() as folder:
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "torch.distributed.run",
                        "--standalone",
                        f"--nproc-per-node={args.processes}",
                        __file__,
                        *shape,
                        f"--child={sharding}",
                        f"--child-out={folder}",
                    ],
                    check=True,
                    env={**env, **extra_env},
                )
                ranks = [
                    json.loads(p.read_text()) for p in sorted(Path(folder).glob("rank-*.json"))
                ]
            peaks[allocator] = max(r["peak_rss_bytes"] for r in ranks)
        state = max(sum(r[k] for k in STATE_PARTS) for r in ranks)
        params = params_from_dict(
            {
                "finetune": {"sharding": sharding, "batch_size": args.batch},
                "data": {"block_size": args.block_size},
            }
        )
        config = build_llama(
            ModelParams(layers=args.layers, hidden=args.hidden, heads=8, kv_heads=4, ffn=args.ffn),
            args.vocab,
            args.block_size,
            0,
            seed=0,
        ).config
        predicted = plan_stages(config, params, bf16=False, processes=args.processes)
        runs[sharding] = {
            "ranks": ranks,
            "state_bytes": state,
            "predicted_state_bytes": sum(predicted["finetune"].device[k] for k in STATE_PARTS),
            "peak_rss_bytes": peaks,
        }
        print(sharding, json.dumps({k: v for k, v in runs[sharding].items() if k != "ranks"}))
    result = {
        "benchmark": "fsdp_memory",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "processes": args.processes,
        "shape": shape,
        "torch": torch.__version__,
        "runs": runs,
        "state_ratio_fsdp_over_none": round(
            runs["fsdp"]["state_bytes"] / runs["none"]["state_bytes"], 3
        ),
        "peak_rss_ratio_fsdp_over_none": {
            allocator: round(
                runs["fsdp"]["peak_rss_bytes"][allocator]
                / runs["none"]["peak_rss_bytes"][allocator],
                3,
            )
            for allocator in ALLOCATORS
        },
    }
    write_json(Path(args.out), result)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
