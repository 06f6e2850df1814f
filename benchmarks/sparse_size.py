"""Bytes of gradprune's sparse export against the dense safetensors export, at 50% sparsity.

What is measured
----------------
For fp32 and bf16 weights, two masks at 50% unstructured sparsity, each exact per tensor
(`gradprune.pruning.masks.masks_for_sparsity(..., scope="per_layer")`):

* magnitude: keep the larger half of |w| in every prunable tensor (what trained weights give
  the byte-plane compressor to work with);
* random: keep a uniformly random half (scores from `torch.rand`, seeded), the same count.

The masks are applied as `gradprune.pruning.masks.apply_masks` does (w * mask, which leaves -0.0 at
every pruned negative weight), then the state dict is written twice: dense with
`safetensors.torch.save_file`, sparse with `gradprune.export.sparse.save_sparse(state, path,
masks)`. Two figures per case:

* prunable ratio: bytes the sparse file stores for the masked tensors (bitmask, compressed top
  byte plane, raw low planes, compressed zero signs) / their dense bytes, from
  `sparse_size_report`;
* file ratio: sparse file size / dense safetensors file size, headers and every unpruned
  tensor (embeddings, norms, lm_head) included.

Bit for bit round trip: `load_sparse` must give back the same names, dtypes and shapes, and
every tensor must pass both `torch.equal(a, b)` and `torch.equal` on the integer views of their
bits (torch.equal alone calls -0.0 equal to 0.0; the bit view does not).

Models: (a) the trained model at --model (a Hugging Face folder; default data/train/model,
else /tmp/default/data/train/model), its prunable tensors being the Linear weights matching
--include (default "model.layers.*", the repository's gradients.include); skipped with a note if
neither folder exists; (b) a synthetic 4096 x 4096 matrix of N(0, 0.02) weights, seeded, as one
prunable Linear weight.

For reference, raw values plus a bitmask at 50% cost 0.5 + 1/(8 x itemsize) of the dense
bytes: 0.53125 for fp32, 0.5625 for bf16. Sizes are deterministic: no timing, no repeats.

    python benchmarks/sparse_size.py [--model data/train/model] [--include "model.layers.*"]
        [--seed 0] [--out benchmarks/results/sparse_size.json]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gradprune.export.sparse import load_sparse, save_sparse, sparse_size_report  # noqa: E402
from gradprune.io import write_json  # noqa: E402
from gradprune.pruning.masks import masks_for_sparsity  # noqa: E402

SPARSITY = 0.5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
FALLBACK_MODEL = Path("/tmp/default/data/train/model")


def find_model(path: str) -> Path | None:
    for candidate in (Path(path), FALLBACK_MODEL):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def trained_state(path: Path, include: list[str]) -> tuple[dict, list[str]]:
    """(state dict with each tensor once, prunable module names)."""
    from gradprune.models.llama import load_model, prunable_linears

    model = load_model(path)
    modules = sorted(prunable_linears(model, tuple(include)))
    unique: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():  # tied weights appear under two names
        if not any(value is seen for seen in unique.values()):
            unique[key] = value.detach().clone()
    return unique, modules


def masks_for(kind: str, state: dict, modules: list[str], seed: int) -> dict[str, torch.Tensor]:
    weights = {m: state[m + ".weight"] for m in modules}
    if kind == "magnitude":
        scores = {m: w.abs().float() for m, w in weights.items()}
    else:
        g = torch.Generator().manual_seed(seed)
        scores = {m: torch.rand(w.shape, generator=g) for m, w in sorted(weights.items())}
    return masks_for_sparsity(scores, SPARSITY, "per_layer")


def bit_identical(original: dict, loaded: dict) -> dict:
    same_keys = sorted(original) == sorted(loaded)
    mismatched = []
    for key in sorted(original):
        a, b = original[key], loaded.get(key)
        ok = (b is not None and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
              and (a.dtype not in BITS or torch.equal(a.view(BITS[a.dtype]),
                                                      b.view(BITS[a.dtype]))))
        if not ok:
            mismatched.append(key)
    return {"identical": same_keys and not mismatched, "tensors": len(original),
            "same_names": same_keys, "mismatched": mismatched[:10],
            "check": "names, dtypes, shapes; torch.equal on values and on integer bit views"}


def measure(state: dict, modules: list[str], kind: str, dtype: torch.dtype, seed: int,
            tmp: Path) -> dict:
    from safetensors.torch import save_file

    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
             for k, v in state.items()}
    masks = masks_for(kind, state, modules, seed)
    for module, mask in masks.items():
        state[module + ".weight"] = state[module + ".weight"] * mask.to(dtype)
    dense_path, sparse_path = tmp / "dense.safetensors", tmp / "sparse.safetensors"
    save_file(state, str(dense_path))
    t0 = time.perf_counter()
    save_sparse(state, sparse_path, masks)
    save_s = time.perf_counter() - t0
    report = sparse_size_report(sparse_path)
    t0 = time.perf_counter()
    loaded = load_sparse(sparse_path)
    load_s = time.perf_counter() - t0
    dense_file = dense_path.stat().st_size
    sparse_file = sparse_path.stat().st_size
    pruned = sum(int((~m).sum()) for m in masks.values())
    prunable = sum(m.numel() for m in masks.values())
    st = report["sparse_tensors"]
    return {
        "mask": kind, "dtype": str(dtype).removeprefix("torch."),
        "prunable_tensors": len(masks), "prunable_params": prunable,
        "total_params": sum(v.numel() for v in state.values()),
        "sparsity_of_prunable": round(pruned / prunable, 6),
        "prunable_dense_bytes": st["dense_bytes"], "prunable_sparse_bytes": st["stored_bytes"],
        "prunable_ratio": round(st["ratio"], 4),
        "dense_file_bytes": dense_file, "sparse_file_bytes": sparse_file,
        "file_ratio": round(sparse_file / dense_file, 4),
        "tensors_stored_sparse": st["count"],
        "raw_values_plus_bitmask_ratio": SPARSITY + 1 / (8 * dtype.itemsize),
        "save_sparse_seconds": round(save_s, 3), "load_sparse_seconds": round(load_s, 3),
        "round_trip": bit_identical(state, loaded),
    }


def machine_info() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads()}


def print_table(results: dict) -> None:
    print()
    print(f"{'model':<10} {'dtype':<5} {'mask':<10} {'prunable ratio':>14} {'file ratio':>10} "
          f"{'dense file':>12} {'sparse file':>12} {'round trip':>10}")
    for model in results["models"]:
        if "skipped" in model:
            print(f"{model['name']:<10} {model['skipped']}")
            continue
        for c in model["cases"]:
            dtype = {"float32": "fp32", "bfloat16": "bf16"}[c["dtype"]]
            print(f"{model['name']:<10} {dtype:<5} "
                  f"{c['mask']:<10} {c['prunable_ratio']:>14.4f} {c['file_ratio']:>10.4f} "
                  f"{c['dense_file_bytes']:>12,} {c['sparse_file_bytes']:>12,} "
                  f"{'identical' if c['round_trip']['identical'] else 'DIFFERS':>10}")
    print()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="bytes of the sparse export against the dense safetensors export at 50%% "
                    "sparsity (see the module docstring)")
    parser.add_argument("--model", default="data/train/model",
                        help=f"trained Hugging Face model folder (default %(default)s, else "
                             f"{FALLBACK_MODEL})")
    parser.add_argument("--include", nargs="+", default=["model.layers.*"],
                        help="fnmatch patterns of prunable Linear module names "
                             "(default %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random mask and the synthetic matrix "
                             "(default %(default)s)")
    parser.add_argument("--out", default="benchmarks/results/sparse_size.json",
                        help="JSON results file (default %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    models = []
    model_path = find_model(args.model)
    if model_path is None:
        models.append({"name": "trained", "skipped": f"no model at {args.model} or "
                                                     f"{FALLBACK_MODEL}"})
    else:
        state, modules = trained_state(model_path, args.include)
        models.append({"name": "trained", "path": str(model_path), "include": args.include,
                       "state": state, "modules": modules})
    g = torch.Generator().manual_seed(args.seed)
    synthetic = torch.empty(4096, 4096).normal_(0.0, 0.02, generator=g)
    models.append({"name": "synthetic", "description": "4096 x 4096, N(0, 0.02), seeded",
                   "state": {"synthetic.weight": synthetic}, "modules": ["synthetic"]})

    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            if "skipped" in model:
                continue
            state, modules = model.pop("state"), model.pop("modules")
            model["cases"] = []
            for dtype_name, dtype in DTYPES.items():
                for kind in ("magnitude", "random"):
                    case = measure(state, modules, kind, dtype, args.seed, Path(tmp))
                    print(f"  {model['name']} {dtype_name} {kind}: prunable "
                          f"{case['prunable_ratio']:.4f}, file {case['file_ratio']:.4f}, "
                          f"round trip {case['round_trip']['identical']}", flush=True)
                    model["cases"].append(case)

    results = {
        "benchmark": "sparse_size",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "config": {"sparsity": SPARSITY, "masks": "per tensor, exact count: magnitude |w| or "
                   "seeded uniform random scores", "seed": args.seed,
                   "dense_export": "safetensors.torch.save_file of the masked state dict",
                   "sparse_export": "gradprune.export.sparse.save_sparse(state, path, masks)",
                   "prunable_ratio": "sparse bytes of the masked tensors / their dense bytes",
                   "file_ratio": "sparse file size / dense safetensors file size"},
        "models": models,
    }
    results["all_identical"] = all(c["round_trip"]["identical"] for m in models
                                   for c in m.get("cases", []))
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out, results)  # temp file beside it, then os.replace; makes the folder
    print_table(results)
    print(f"wrote {args.out} ({results['wall_seconds']} s)")
    return 0 if results["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
