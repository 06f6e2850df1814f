"""Throughput of the train and gradients stages against a bare PyTorch loop, as ratios.

What is measured
----------------
Two comparisons, each on the model sizes of a params file (the `model` section, with
`train.batch_size`, `train.bf16`, `gradients.bf16` and the data section's vocabulary and block
size) and on the same token blocks for both contestants:

* train: `gradprune.training.loop.train_lm` for --steps optimizer steps against a bare loop over
  the same batches (`batch_order` with the same seed) on the same initial weights (a fresh
  `build_llama` with the same seed for every run): plain `torch.optim.AdamW`, the same bf16
  autocast setting, `model(input_ids=b, labels=b).loss.backward(); opt.step();
  opt.zero_grad()`, with no clipping, no learning-rate schedule and no validation.
  `train_lm` always validates after its last step; here `eval_every` is set past the last step
  and `eval_blocks` to 1, so that is a single one-block forward pass. Each such validation is
  also timed on its own (a `mean_loss` call on the same block right after the run) and
  subtracted: `ratio` compares training alone, `ratio_including_validation` is the raw
  `train_lm` figure. Gradient clipping, the lr schedule, the finiteness check and the param
  groups are part of gradprune's cost, as they are part of the stage.
* gradients: `gradprune.pruning.stats.collect_gradient_stats` over --calibration-blocks blocks (one
  block per forward/backward, as the stage does) against a bare loop doing the same per-block
  forward and backward with no hooks and no accumulators. The baseline computes the same
  gradients: like `collect_gradient_stats` it requires gradients only for the prunable Linear
  weights (`gradients.include`/`exclude`) and drops each gradient after its block.

The shared machines these run on are noisy, so absolute tokens/s are reported but only the
ratios are meant to be compared between runs and machines. Everything runs in one process;
each contestant gets one untimed warm-up (one step / one block), then runs alternate
baseline, gradprune, baseline, gradprune, ... for --repeats rounds. Each method's figure is
the median of its repeats; model construction is never timed.

How to read the ratio
---------------------
    ratio = gradprune tokens/s / baseline tokens/s  (= baseline median s / gradprune median s)

1.0 means gradprune's loop costs nothing over the bare loop; 0.9 means it runs at 90 % of the
bare loop's speed (about 11 % more time per token). `paired_ratios` holds the same ratio per
round (each baseline run against the gradprune run right after it); their spread is a rough
measure of how noisy the machine was. Another busy process on the same cores can slow single
runs several-fold (PyTorch's worker threads wait on whichever one was descheduled); a wide
spread of `paired_ratios` says so, and the run is worth repeating on a quieter machine.
`ratio_best` compares the fastest run of each method (timeit's rule: interference only ever
adds time), a cross-check when the spread is wide. For the gradients contest, `ratio_cpu` is
the same ratio of median process CPU seconds (user + system, every thread): it leaves out the
time the process waited for a core, so with one thread (OMP_NUM_THREADS=1) on a shared machine
it is the steadier figure; with several threads it also counts threads spinning at barriers.
Each gradients run's user and system seconds and minor page faults are in the JSON too.

With the defaults (6 steps, 5 rounds, 8 calibration blocks) a run takes about 30 s on two idle
cores with the repository's params.yaml (batch 8 x 256 tokens) and about a minute at batch 16.

When the prepared blocks (--blocks, by default data/prepare/train.parquet) do not exist,
random token ids of the same shape stand in (`"data": "random"` in the JSON); the cost of a
forward/backward pass does not depend on which tokens it sees.

    python benchmarks/throughput.py [--params params.yaml] [--blocks PATH] [--steps N]
        [--repeats R] [--calibration-blocks C] [--out benchmarks/results/throughput.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gradprune.config import Params, load_params  # noqa: E402
from gradprune.data import read_blocks  # noqa: E402
from gradprune.io import write_json  # noqa: E402
from gradprune.models.llama import bf16_enabled, build_llama, prunable_linears  # noqa: E402
from gradprune.pruning.stats import collect_gradient_stats, requested_statistics  # noqa: E402
from gradprune.training.loop import batch_order, mean_loss, train_lm  # noqa: E402

EOS_ID = 0  # the BPE tokenizer's only special token comes first; irrelevant to speed


# -------------------------------------------------------------------------------------- data


def load_or_fake_blocks(path: Path, params: Params, needed: int) -> tuple[torch.Tensor, str, int]:
    """(blocks, data label, vocabulary size): the prepared blocks, or random ids if missing."""
    if path.is_file():
        blocks = read_blocks(path)
        vocab = max(params.data.vocab_size, int(blocks.max()) + 1)
        if len(blocks) < needed:  # a tiny corpus: repeat it (batch_order reshuffles anyway)
            blocks = blocks.repeat(-(-needed // len(blocks)), 1)
        return blocks, str(path), vocab
    g = torch.Generator().manual_seed(params.seed)
    vocab = params.data.vocab_size
    blocks = torch.randint(0, vocab, (needed, params.data.block_size), generator=g)
    return blocks, "random", vocab


def calibration_sample(blocks: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """A seeded sample of blocks, drawn the way the gradients stage draws its calibration set."""
    pick = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed + 1))
    return blocks[pick[:count].sort().values]


# ------------------------------------------------------------------------------- contestants


def fresh_model(params: Params, vocab: int, context: int):
    gc.collect()
    return build_llama(params.model, vocab, context, EOS_ID, params.seed)


def bare_train(model, blocks: torch.Tensor, batch_size: int, steps: int, seed: int, lr: float,
               bf16: bool) -> None:
    order = batch_order(len(blocks), batch_size, steps, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        batch = blocks[order[step]]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def bare_gradients(model, linears: dict, blocks: torch.Tensor, bf16: bool) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in linears.values():
        layer.weight.requires_grad_(True)
    try:
        for block in blocks:
            batch = block.unsqueeze(0)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            for layer in linears.values():
                layer.weight.grad = None
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def timed_with_usage(fn) -> dict:
    """Wall seconds of one call, and the process's user and system CPU seconds (every thread)
    and minor page faults during it."""
    wall, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    fn()
    wall, after = time.perf_counter() - wall, resource.getrusage(resource.RUSAGE_SELF)
    return {"wall": wall, "user": after.ru_utime - before.ru_utime,
            "system": after.ru_stime - before.ru_stime,
            "page_faults": after.ru_minflt - before.ru_minflt}


# ------------------------------------------------------------------------------- benchmarks


def bench_train(params: Params, blocks: torch.Tensor, vocab: int, steps: int, repeats: int,
                bf16: bool) -> dict:
    base_cfg = params.train
    context = blocks.shape[1]
    val = blocks[:1]

    def cfg_for(n: int):
        return dataclasses.replace(base_cfg, steps=n, warmup_steps=min(base_cfg.warmup_steps, n),
                                   eval_every=n + 1, eval_blocks=1)

    def run_baseline(n: int) -> float:
        model = fresh_model(params, vocab, context)
        return timed(lambda: bare_train(model, blocks, base_cfg.batch_size, n, params.seed,
                                        base_cfg.lr, bf16))

    def run_gradprune(n: int) -> tuple[float, float]:
        model = fresh_model(params, vocab, context)
        seconds = timed(lambda: train_lm(model, blocks, val, cfg_for(n), params.seed, bf16))
        validation = timed(lambda: mean_loss(model, val, base_cfg.batch_size, bf16))
        return seconds, validation

    run_baseline(1)  # warm-up: allocator, kernels, autocast caches
    run_gradprune(1)
    base_s, gp_s, gp_val_s = [], [], []
    for r in range(repeats):
        base_s.append(run_baseline(steps))
        seconds, validation = run_gradprune(steps)
        gp_s.append(seconds)
        gp_val_s.append(validation)
        print(f"  train round {r + 1}/{repeats}: baseline {base_s[-1]:.2f} s, gradprune "
              f"{gp_s[-1]:.2f} s (of which ~{validation:.2f} s validation)", flush=True)

    tokens = steps * base_cfg.batch_size * context
    gp_train_only = [max(s - v, 1e-9) for s, v in zip(gp_s, gp_val_s)]
    baseline = summary(base_s, tokens)
    gradprune = summary(gp_train_only, tokens)
    gradprune_raw = summary(gp_s, tokens)
    return {
        "tokens_per_run": tokens,
        "steps": steps,
        "batch_size": base_cfg.batch_size,
        "bf16": bf16,
        "includes": {
            "baseline": "forward+backward+AdamW step per batch; no clipping, no lr schedule, "
                        "no validation",
            "gradprune": "train_lm minus its final validation: forward+backward, finiteness "
                         "check, clip_grad_norm_, lr schedule, AdamW step (two param groups)",
            "gradprune_including_validation": "train_lm as called, with eval_every > steps and "
                                              "eval_blocks = 1: one final one-block mean_loss",
            "validation_subtracted": "per round, a separately timed mean_loss on the same "
                                     "block right after the run",
        },
        "baseline": baseline,
        "gradprune": {**gradprune, "validation_seconds": rounded(gp_val_s)},
        "gradprune_including_validation": gradprune_raw,
        "ratio": round(gradprune["tokens_per_second"] / baseline["tokens_per_second"], 4),
        "ratio_including_validation": round(
            gradprune_raw["tokens_per_second"] / baseline["tokens_per_second"], 4),
        "ratio_best": round(baseline["min_seconds"] / gradprune["min_seconds"], 4),
        "paired_ratios": [round(b / g, 4) for b, g in zip(base_s, gp_train_only)],
    }


def bench_gradients(params: Params, blocks: torch.Tensor, vocab: int, count: int, repeats: int,
                    bf16: bool) -> dict:
    """The bare loop against the lean pass twice: with the statistics a gradient backward
    yields (what gradients.statistics asks for, less the X^T X Hessians: each costs an
    in_features^2 matmul per Linear, about a third of a forward/backward, and belongs to
    SparseGPT, whose calibration is a forward-only pass), and with all it asks for."""
    cfg = params.gradients
    context = blocks.shape[1]
    calibration = calibration_sample(blocks, count, params.seed)
    requested = requested_statistics(params)
    variants = {"gradprune": tuple(s for s in requested if s != "hessian") or ("act_norm",),
                "gradprune_requested": requested}

    def run(which: str, sample: torch.Tensor) -> dict:
        model = fresh_model(params, vocab, context)
        linears = prunable_linears(model, cfg.include, cfg.exclude)
        if which == "baseline":
            return timed_with_usage(lambda: bare_gradients(model, linears, sample, bf16))
        return timed_with_usage(lambda: collect_gradient_stats(model, linears, sample, bf16,
                                                               variants[which]))

    for which in ("baseline", *variants):  # warm-up
        run(which, calibration[:1])
    seconds = {which: [] for which in ("baseline", *variants)}
    usage = {which: [] for which in seconds}
    for r in range(repeats):
        for which in seconds:
            usage[which].append(run(which, calibration))
            seconds[which].append(usage[which][-1]["wall"])
        print(f"  gradients round {r + 1}/{repeats}: " + ", ".join(
            f"{w} {s[-1]:.2f} s" for w, s in seconds.items()), flush=True)

    tokens = int(calibration.numel())
    baseline = summary(seconds["baseline"], tokens)
    result = {
        "tokens_per_run": tokens,
        "calibration_blocks": len(calibration),
        "statistics": {which: list(stats) for which, stats in variants.items()},
        "bf16": bf16,
        "includes": {
            "baseline": "per block: forward+backward with gradients only for the prunable "
                        "Linear weights, gradients dropped; no hooks, no accumulators",
            "gradprune": "collect_gradient_stats, the lean pass, with the requested "
                         "statistics but the Hessians: input pre-hooks, fp32 accumulators, "
                         "each gradient folded by a post-accumulate-grad hook",
            "gradprune_requested": "the same with every statistic gradients.statistics asks "
                                   "for, Hessians (X^T X per Linear) included",
        },
        "baseline": {**baseline, **usage_summary(usage["baseline"])},
    }
    base_cpu = result["baseline"]["median_cpu_seconds"]
    for which in variants:
        mine = {**summary(seconds[which], tokens), **usage_summary(usage[which])}
        suffix = "" if which == "gradprune" else "_requested"
        result[which] = mine
        result[f"ratio_cpu{suffix}"] = round(base_cpu / mine["median_cpu_seconds"], 4)
        result[f"ratio{suffix}"] = round(mine["tokens_per_second"]
                                         / baseline["tokens_per_second"], 4)
        result[f"ratio_best{suffix}"] = round(baseline["min_seconds"] / mine["min_seconds"], 4)
        result[f"paired_ratios{suffix}"] = [round(b / g, 4) for b, g in
                                            zip(seconds["baseline"], seconds[which])]
    return result


def summary(seconds: list[float], tokens: int) -> dict:
    median = statistics.median(seconds)
    return {"seconds": rounded(seconds), "median_seconds": round(median, 4),
            "tokens_per_second": round(tokens / median, 1),
            "min_seconds": round(min(seconds), 4)}


def usage_summary(runs: list[dict]) -> dict:
    """Per run: user and system CPU seconds and minor page faults; medians of each and of
    user + system."""
    cpu = [r["user"] + r["system"] for r in runs]
    return {"user_seconds": rounded([r["user"] for r in runs]),
            "system_seconds": rounded([r["system"] for r in runs]),
            "page_faults": [r["page_faults"] for r in runs],
            "median_cpu_seconds": round(statistics.median(cpu), 4),
            "median_user_seconds": round(statistics.median(r["user"] for r in runs), 4),
            "median_system_seconds": round(statistics.median(r["system"] for r in runs), 4),
            "median_page_faults": statistics.median(r["page_faults"] for r in runs)}


def rounded(values: list[float]) -> list[float]:
    return [round(v, 4) for v in values]


# ------------------------------------------------------------------------------------ main


def machine_info() -> dict:
    import transformers

    try:
        cpus_usable = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus_usable = os.cpu_count()
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cpus_usable": cpus_usable,
        "cpu_count": os.cpu_count(),
    }


def print_table(results: dict) -> None:
    print()
    print(f"{'stage':<10} {'method':<10} {'median s':>9} {'tokens/s':>10}")
    for stage in ("train", "gradients"):
        r = results[stage]
        for method in ("baseline", "gradprune"):
            m = r[method]
            print(f"{stage:<10} {method:<10} {m['median_seconds']:>9.3f} "
                  f"{m['tokens_per_second']:>10.1f}")
        paired = r["paired_ratios"]
        extra = (f"; incl. validation {r['ratio_including_validation']:.3f}"
                 if "ratio_including_validation" in r else "")
        if "ratio_cpu" in r:
            extra += f"; CPU time {r['ratio_cpu']:.3f}"
        print(f"{stage:<10} {'ratio':<10} {r['ratio']:>9.3f}   (fastest runs "
              f"{r['ratio_best']:.3f}; per round {min(paired):.3f}..{max(paired):.3f}{extra})")
        if "ratio_requested" in r:
            print(f"{stage:<10} {'+hessians':<10} {r['ratio_requested']:>9.3f}   (CPU time "
                  f"{r['ratio_cpu_requested']:.3f}; every requested statistic: "
                  f"{', '.join(r['statistics']['gradprune_requested'])})")
    print()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="tokens/s of the train and gradients stages relative to a bare PyTorch "
                    "forward/backward loop on the same model and data (see the module docstring)")
    parser.add_argument("--params", default="params.yaml",
                        help="params file (default %(default)s)")
    parser.add_argument("--blocks", default="data/prepare/train.parquet",
                        help="prepared token blocks; random ids of the same shape if missing "
                             "(default %(default)s)")
    parser.add_argument("--steps", type=int, default=6,
                        help="optimizer steps per timed train run (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="alternating baseline/gradprune rounds per comparison "
                             "(default %(default)s)")
    parser.add_argument("--calibration-blocks", type=int, default=None,
                        help="blocks per timed gradients run (default: 8, or "
                             "gradients.calibration_blocks if smaller)")
    parser.add_argument("--out", default="benchmarks/results/throughput.json",
                        help="JSON results file (default %(default)s)")
    args = parser.parse_args(argv)
    for name in ("steps", "repeats", "calibration_blocks"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    params = load_params(args.params)
    count = args.calibration_blocks or min(8, params.gradients.calibration_blocks)
    needed = max(args.steps * params.train.batch_size, count)
    blocks, data_label, vocab = load_or_fake_blocks(Path(args.blocks), params, needed)
    # A CPU benchmark: bare loops and stages alike compute on the CPU.
    cpu = torch.device("cpu")
    train_bf16 = bf16_enabled(params.train.bf16, cpu)
    grad_bf16 = bf16_enabled(params.gradients.bf16, cpu)
    print(f"throughput: data {data_label}, {len(blocks)} blocks x {blocks.shape[1]} tokens, "
          f"vocab {vocab}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}", flush=True)

    results: dict = {
        "benchmark": "throughput",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "config": {
            "params": str(args.params),
            "data": data_label,
            "blocks_available": len(blocks),
            "vocab_size": vocab,
            "block_size": int(blocks.shape[1]),
            "model": dataclasses.asdict(params.model),
            "seed": params.seed,
            "batch_size": params.train.batch_size,
            "steps": args.steps,
            "repeats": args.repeats,
            "warmup": "one untimed run per method before timing (1 step / 1 block)",
            "calibration_blocks": count,
            "train_bf16_setting": params.train.bf16,
            "gradients_bf16_setting": params.gradients.bf16,
            "order": "alternating per round: baseline, then gradprune; figures are medians",
        },
    }
    results["train"] = bench_train(params, blocks, vocab, args.steps, args.repeats, train_bf16)
    results["gradients"] = bench_gradients(params, blocks, vocab, count, args.repeats, grad_bf16)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)

    write_json(args.out, results)  # temp file beside it, then os.replace; makes the folder
    print_table(results)
    print(f"wrote {args.out} ({results['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
