"""The plan's predicted peaks against the peaks the stages measured, as ratios.

Reads a pipeline folder that has run (its params.yaml, data/train/model/config.json and the
stages' metrics files: peak_device_mb on a GPU, else peak_rss_mb, the process's peak resident
set) and prints measured / predicted per stage; within 0.8..1.2 is the target. The micro DAG of
the tests, the SmolLM2 preset (scripts/gpu_check.sh leaves such a folder, on a GPU or a CPU)
and any `dvc repro` checkout work alike.

    python benchmarks/plan_check.py FOLDER [FOLDER...] [--out benchmarks/results/plan_check.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gradprune.config import load_params  # noqa: E402
from gradprune.device import bf16_supported  # noqa: E402
from gradprune.io import write_json  # noqa: E402
from gradprune.plan import STAGES, plan_stages, read_llama_config  # noqa: E402

MIB = 2**20


def check_folder(folder: Path) -> dict:
    import torch

    params = load_params(folder / "params.yaml")
    config = read_llama_config(folder / "data" / "train" / "model")
    rows = {}
    for stage in STAGES:
        metrics_file = folder / "metrics" / f"{stage}.json"
        if not metrics_file.is_file():
            continue
        metrics = json.loads(metrics_file.read_text())
        on_gpu = bool(metrics.get("cuda"))
        setting = getattr(getattr(params, stage, None), "bf16", "auto")
        bf16 = setting == "on" or (setting == "auto" and bf16_supported(
            torch.device("cuda" if on_gpu else "cpu")))
        need = plan_stages(config, params, bf16)[stage]
        totals = need.totals(on_cpu=not on_gpu)
        predicted = totals["device" if on_gpu else "host"] / MIB
        measured = metrics["peak_device_mb"] if on_gpu else metrics["peak_rss_mb"]
        rows[stage] = {"measured_mib": measured, "predicted_mib": round(predicted, 1),
                       "ratio": round(measured / predicted, 3),
                       "memory": "device" if on_gpu else "host"}
    return {"folder": str(folder), "model": config.to_dict().get("_name_or_path") or
            f"{config.num_hidden_layers} layers x {config.hidden_size}", "stages": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", default="benchmarks/results/plan_check.json")
    args = parser.parse_args(argv)
    results = [check_folder(f) for f in args.folders]
    for r in results:
        print(f"{r['folder']} ({r['model']})")
        for stage, row in r["stages"].items():
            flag = "" if 0.8 <= row["ratio"] <= 1.2 else "   outside 0.8..1.2"
            print(f"  {stage:<10} {row['memory']:<6} measured {row['measured_mib']:>9.1f} MiB  "
                  f"predicted {row['predicted_mib']:>9.1f} MiB  ratio {row['ratio']:.3f}{flag}")
    write_json(args.out, {"benchmark": "plan_check",
                          "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
