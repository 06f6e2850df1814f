"""Exact global threshold selection: time and peak memory against torch.kthvalue and torch.sort.

What is measured
----------------
For each size n (default 1e7, 1e8 and 1e9 scores) the k-th smallest of n non-negative float32
scores, k = round(--sparsity * n), found four ways on the same scores:

* gradprune_kth: `gradprune.pruning.masks.kth_smallest` over the score tensors as they are, a list of
  layer-sized tensors (2-D, 2^22, 2^23 and 2^24 entries in turn, the last one cut to fit).
  It is the exact two-pass radix select over the float bit patterns; no sort, no copy.
* gradprune_masks: `gradprune.pruning.masks.masks_for_sparsity(scores, sparsity, "global")` end to
  end: the score checks (finite, non-negative), the select, and the bool masks it returns
  (1 byte per score, counted in its memory: they are its output).
* torch_kthvalue: `torch.kthvalue(torch.cat(flat layers), k)`.
* torch_sort: `torch.sort(torch.cat(flat layers)).values[k - 1]`.

The torch baselines need the scores in one tensor, and a model's scores come as one tensor per
layer, so the concatenation is part of their cost: its time is in their `seconds` (and shown
apart as `cat_seconds`) and its n x 4 bytes are in their peak memory.

Scores are |N(0, 1)| rounded to bfloat16 precision (8 significant bits) and stored as
float32, so there are only a few thousand distinct values and about 0.25% of the scores equal
the k-th value (25 thousand at 1e7, 2.5 million at 1e9; `scores_equal_to_kth_value` in the
JSON): heavy ties, as gradient scores have. Every method must
return the same k-th value bit for bit (`agree` in the JSON); gradprune_masks is checked by
counting its pruned entries (exactly k) and taking the largest pruned score and the smallest
kept one, both must bracket the value, after its peak memory has been read.

Peak memory: every run is a fresh subprocess (`--worker`), so peaks never mix. The worker
builds the scores (each layer in place, temporaries at most one layer's size), then resets the
kernel's peak-RSS counter (writing 5 to /proc/self/clear_refs sets VmHWM to the current RSS)
and reads VmRSS; after the method it reads VmHWM. `peak_extra_bytes` = VmHWM - that RSS: the
memory the method needed beyond the scores it was given. Where clear_refs cannot be written the
worker falls back to getrusage(RUSAGE_SELF).ru_maxrss minus the same RSS (then a
generation-time peak above it could hide a smaller method peak; the JSON says which was used).

A baseline is skipped where its estimated peak would pass --memory-limit-gb (default 11 GiB,
whole process, scores included). kthvalue holds the scores (4 bytes each), their
concatenation (4), its copy of the values (4) and int64 indices (8): 20 bytes per score. sort
holds the same plus another 8 bytes of int64 scratch: 28 bytes per score (both as measured at
1e7 and 1e8). At 1e9 that is about 20 and 28 GB (21 and 29 with a 1 GiB allowance for the
interpreter and temporaries), so both are skipped there and the JSON says "skipped: needs ~N GB".

Timing: one subprocess per run; rounds alternate kthvalue, sort, gradprune_kth,
gradprune_masks; each figure is the median of --repeats rounds (default 3 below 1e9 scores, 1
at 1e9). torch uses its default thread count (2 on the 2-core machines). Ratios are against
torch_kthvalue at the same size, measured in the same invocation:

    ratio = torch_kthvalue median s / method median s   (2.0: twice as fast as kthvalue)

At 1e9, where kthvalue does not fit, there is no ratio. Absolute seconds move with the load on
a shared machine; the ratios are what compare between runs. Generating 1e9 scores takes about
half a minute per subprocess and is not timed.

    python benchmarks/selection.py [--sizes 1e7,1e8,1e9] [--repeats R] [--sparsity 0.5]
        [--memory-limit-gb 11] [--out benchmarks/results/selection.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

METHODS = ("torch_kthvalue", "torch_sort", "gradprune_kth", "gradprune_masks")
BASELINE = "torch_kthvalue"
LAYER_SIZES = ((1024, 4096), (2048, 4096), (4096, 4096))  # 2^22, 2^23, 2^24 entries
# Estimated bytes per score a method needs beyond the scores themselves (see the docstring).
EXTRA_BYTES_PER_SCORE = {"torch_kthvalue": 4 + 4 + 8, "torch_sort": 4 + 4 + 8 + 8,
                         "gradprune_kth": 0, "gradprune_masks": 1}
FIXED_EXTRA_BYTES = 1 << 30  # interpreter, torch, chunk temporaries: a generous allowance
GIB = 1 << 30


# ----------------------------------------------------------------------------------- worker


def layer_shapes(n: int) -> list[tuple[int, ...]]:
    shapes, left, i = [], n, 0
    while left > 0:
        rows, cols = LAYER_SIZES[i % len(LAYER_SIZES)]
        if rows * cols <= left:
            shapes.append((rows, cols))
            left -= rows * cols
        else:
            shapes.append((left,))
            left = 0
        i += 1
    return shapes


def make_scores(n: int, seed: int) -> dict:
    """|N(0,1)| rounded to bf16 precision, as float32, one tensor per layer, built in place."""
    import torch

    scores = {}
    for i, shape in enumerate(layer_shapes(n)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        t = torch.empty(shape, dtype=torch.float32)
        t.normal_(generator=g).abs_()
        t.copy_(t.to(torch.bfloat16))  # ties: 8 significant bits
        scores[f"layers.{i:04d}"] = t
    return scores


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def float_bits(value: float) -> str:
    return struct.pack(">f", value).hex()


def worker(method: str, n: int, k: int, sparsity: float, seed: int) -> dict:
    import gc

    import torch

    from gradprune.pruning.masks import kth_smallest, masks_for_sparsity

    t0 = time.perf_counter()
    scores = make_scores(n, seed)
    generate_s = time.perf_counter() - t0
    gc.collect()
    exact_peak = _reset_peak()
    rss_before = _status_kib("VmRSS") * 1024
    out: dict = {"method": method, "n": n, "k": k, "threads": torch.get_num_threads(),
                 "generate_seconds": round(generate_s, 3)}

    t0 = time.perf_counter()
    if method == "gradprune_kth":
        value, below = kth_smallest(list(scores.values()), k)
        seconds = time.perf_counter() - t0
        result = {"value": value, "below": below}
    elif method == "gradprune_masks":
        masks = masks_for_sparsity(scores, sparsity, "global")
        seconds = time.perf_counter() - t0
        result = {"masks": masks}
    else:
        flat = torch.cat([t.reshape(-1) for t in scores.values()])
        cat_s = time.perf_counter() - t0
        if method == "torch_kthvalue":
            value = torch.kthvalue(flat, k).values.item()
        else:
            value = torch.sort(flat).values[k - 1].item()
        seconds = time.perf_counter() - t0
        out["cat_seconds"] = round(cat_s, 4)
        result = {"value": value}

    if exact_peak:
        peak = _status_kib("VmHWM") * 1024
        out["peak_method"] = "VmHWM after clear_refs reset, minus VmRSS at the reset"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["peak_method"] = "ru_maxrss minus VmRSS after the scores were built"
    out["seconds"] = round(seconds, 4)
    out["rss_with_scores_bytes"] = rss_before
    out["peak_extra_bytes"] = peak - rss_before

    # Checks, after the peak was read.
    if method == "gradprune_masks":
        masks = result.pop("masks")
        pruned = sum(int((~m).sum()) for m in masks.values())
        top_pruned = max(float(s[~m].max()) for s, m in zip(scores.values(), masks.values())
                         if (~m).any())
        low_kept = min(float(s[m].min()) for s, m in zip(scores.values(), masks.values())
                       if m.any())
        out.update(pruned=pruned, value=top_pruned, smallest_kept=low_kept,
                   exact_count=pruned == k, brackets=top_pruned <= low_kept)
    else:
        out.update(result)
    if method == "gradprune_kth":
        out["scores_equal_to_value"] = sum(int((t == out["value"]).sum())
                                           for t in scores.values())
    out["value_bits"] = float_bits(out["value"])
    return out


# ------------------------------------------------------------------------------------- main


def estimated_peak_bytes(method: str, n: int) -> int:
    return n * (4 + EXTRA_BYTES_PER_SCORE[method]) + FIXED_EXTRA_BYTES


def run_worker(method: str, n: int, k: int, sparsity: float, seed: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--n", str(n),
           "--k", str(k), "--sparsity", str(sparsity), "--seed", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} at n={n} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    seconds = [r["seconds"] for r in runs]
    peaks = [r["peak_extra_bytes"] for r in runs]
    out = {"seconds": seconds, "median_seconds": round(statistics.median(seconds), 4),
           "min_seconds": round(min(seconds), 4),
           "peak_extra_bytes": peaks, "median_peak_extra_bytes": int(statistics.median(peaks)),
           "rss_with_scores_bytes": runs[0]["rss_with_scores_bytes"],
           "generate_seconds": [r["generate_seconds"] for r in runs],
           "peak_method": runs[0]["peak_method"],
           "value": runs[0]["value"], "value_bits": runs[0]["value_bits"]}
    if "cat_seconds" in runs[0]:
        out["cat_seconds"] = [r["cat_seconds"] for r in runs]
    if "below" in runs[0]:
        out["below"] = runs[0]["below"]
        out["scores_equal_to_value"] = runs[0]["scores_equal_to_value"]
    if "pruned" in runs[0]:
        out.update(pruned=runs[0]["pruned"], smallest_kept=runs[0]["smallest_kept"],
                   exact_count=all(r["exact_count"] for r in runs),
                   brackets=all(r["brackets"] for r in runs))
    out["consistent_across_repeats"] = len({r["value_bits"] for r in runs}) == 1
    return out


def bench_size(n: int, repeats: int, sparsity: float, seed: int, limit: int) -> dict:
    k = round(sparsity * n)
    shapes = layer_shapes(n)
    entry: dict = {"n": n, "k": k, "score_bytes": 4 * n, "tensors": len(shapes),
                   "largest_tensor": max(s[0] * (s[1] if len(s) > 1 else 1) for s in shapes),
                   "repeats": repeats, "methods": {}}
    active = []
    for method in METHODS:
        need = estimated_peak_bytes(method, n)
        if need > limit:
            entry["methods"][method] = {
                "skipped": f"skipped: needs ~{need / 1e9:.0f} GB (estimated peak of the process, "
                           f"scores included) > --memory-limit-gb {limit / GIB:g}",
                "estimated_peak_bytes": need}
        else:
            active.append(method)
    runs: dict[str, list[dict]] = {m: [] for m in active}
    for r in range(repeats):
        for method in active:
            result = run_worker(method, n, k, sparsity, seed)
            runs[method].append(result)
            print(f"  n={n:.0e} round {r + 1}/{repeats} {method:<16} {result['seconds']:8.3f} s "
                  f"peak +{result['peak_extra_bytes'] / GIB:6.3f} GiB "
                  f"(scores built in {result['generate_seconds']:.1f} s)", flush=True)
    for method in active:
        entry["methods"][method] = summarise(runs[method])
    base = entry["methods"].get(BASELINE)
    for method in active:
        m = entry["methods"][method]
        m["ratio_vs_kthvalue"] = (round(base["median_seconds"] / m["median_seconds"], 3)
                                  if base and "median_seconds" in base else None)
    values = {m: entry["methods"][m]["value_bits"] for m in active}
    entry["kth_value"] = entry["methods"][active[0]]["value"] if active else None
    entry["agree"] = (len(set(values.values())) == 1
                      and all(entry["methods"][m]["consistent_across_repeats"] for m in active)
                      and entry["methods"].get("gradprune_masks", {}).get("exact_count", True))
    if "gradprune_kth" in runs:
        below = entry["methods"]["gradprune_kth"]["below"]
        entry["ties_at_kth_value_pruned"] = k - below
        entry["scores_equal_to_kth_value"] = entry["methods"]["gradprune_kth"][
            "scores_equal_to_value"]
    return entry


def machine_info() -> dict:
    import torch

    try:
        cpus_usable = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus_usable = os.cpu_count()
    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            mem_total = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {"torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(), "cpus_usable": cpus_usable,
            "cpu_count": os.cpu_count(), "memory_bytes": mem_total}


def fmt_gib(b: float) -> str:
    return f"{b / GIB:.3f}"


def print_table(results: dict) -> None:
    print()
    print(f"{'n':>6} {'method':<16} {'median s':>9} {'vs kthvalue':>11} {'peak +GiB':>10} "
          f"{'k-th value':>12}")
    for entry in results["sizes"]:
        for method in METHODS:
            m = entry["methods"][method]
            if "skipped" in m:
                print(f"{entry['n']:>6.0e} {method:<16} {m['skipped']}")
                continue
            ratio = m["ratio_vs_kthvalue"]
            print(f"{entry['n']:>6.0e} {method:<16} {m['median_seconds']:>9.3f} "
                  f"{(f'{ratio:.2f}x' if ratio else '-'):>11} "
                  f"{fmt_gib(m['median_peak_extra_bytes']):>10} {m['value']:>12.8g}")
        print(f"{'':>6} answers agree: {entry['agree']}; scores {fmt_gib(entry['score_bytes'])} "
              f"GiB in {entry['tensors']} tensors")
    print()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="time and peak memory of gradprune's exact global k-th score selection "
                    "against torch.kthvalue and torch.sort (see the module docstring)")
    parser.add_argument("--sizes", default="1e7,1e8,1e9",
                        help="comma-separated score counts (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds per size (default 3 below 1e9 scores, 1 from 1e9)")
    parser.add_argument("--sparsity", type=float, default=0.5,
                        help="k = round(sparsity * n) (default %(default)s)")
    parser.add_argument("--memory-limit-gb", type=float, default=11.0,
                        help="skip a method whose estimated process peak passes this many GiB "
                             "(default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="score seed (default %(default)s)")
    parser.add_argument("--out", default="benchmarks/results/selection.json",
                        help="JSON results file (default %(default)s)")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if not 0 < args.sparsity < 1:
        parser.error("--sparsity must lie in (0, 1)")
    try:
        args.size_list = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes: not a list of numbers: {args.sizes!r}")
    if not args.size_list or min(args.size_list) < 1:
        parser.error("--sizes needs positive counts")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.k, args.sparsity, args.seed)))
        return 0
    from gradprune.io import write_json

    started = time.perf_counter()
    limit = int(args.memory_limit_gb * GIB)
    info = machine_info()
    print(f"selection: sizes {args.size_list}, sparsity {args.sparsity}, "
          f"{info['torch_threads']} threads, {info['cpu_capability']}", flush=True)
    results: dict = {
        "benchmark": "selection",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": info,
        "config": {
            "sizes": args.size_list, "sparsity": args.sparsity, "seed": args.seed,
            "memory_limit_bytes": limit,
            "scores": "|N(0,1)| rounded to bfloat16 precision, stored float32; layer tensors "
                      "of 2^22, 2^23, 2^24 entries in turn (last one cut to fit)",
            "order": "per round: torch_kthvalue, torch_sort, gradprune_kth, gradprune_masks, "
                     "each in a fresh subprocess; figures are medians over rounds",
            "includes": {
                "torch_kthvalue": "torch.cat of the flattened layers + torch.kthvalue",
                "torch_sort": "torch.cat of the flattened layers + torch.sort, element k-1",
                "gradprune_kth": "gradprune.pruning.masks.kth_smallest on the list of layer tensors",
                "gradprune_masks": "gradprune.pruning.masks.masks_for_sparsity(scope='global'): score "
                                   "checks, select, bool masks (1 byte per score, its output)",
            },
            "peak_extra_bytes": "peak RSS during the method minus RSS with the scores built, "
                                "per fresh subprocess (see peak_method)",
            "ratio_vs_kthvalue": "torch_kthvalue median s / method median s (> 1: faster)",
        },
        "sizes": [],
    }
    for n in args.size_list:
        repeats = args.repeats or (1 if n >= 10**9 else 3)
        t0 = time.perf_counter()
        entry = bench_size(n, repeats, args.sparsity, args.seed, limit)
        entry["wall_seconds"] = round(time.perf_counter() - t0, 1)
        results["sizes"].append(entry)
        print(f"  n={n:.0e} done in {entry['wall_seconds']} s; agree: {entry['agree']}",
              flush=True)
    results["all_agree"] = all(e["agree"] for e in results["sizes"])
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out, results)  # temp file beside it, then os.replace; makes the folder
    print_table(results)
    print(f"wrote {args.out} ({results['wall_seconds']} s)")
    return 0 if results["all_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
