"""Peak memory of a fine-tuning step with the loss over the whole batch against a chunked loss
(finetune.loss_chunk), on the packaged SmolLM2-135M, as a ratio.

Each setting runs in a fresh child process (its peak resident set is its own): the model loaded
in fp32, one `train_lm` optimizer step (AdamW, clipping, bf16 autocast as the CPU allows) on
--batch blocks of --block-size random tokens, validation on one block. Random token ids stand
in for text: memory does not depend on which tokens.

    python benchmarks/finetune_memory.py [--batch 4] [--block-size 512] [--chunk 128]
        [--out benchmarks/results/finetune_memory.json]
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

from gradprune.config import TrainParams  # noqa: E402
from gradprune.io import write_json  # noqa: E402
from gradprune.models.llama import bf16_enabled  # noqa: E402
from gradprune.models.sources import load_source_model  # noqa: E402
from gradprune.training.loop import train_lm  # noqa: E402


def child(args) -> dict:
    model = load_source_model("smollm2")[0]
    vocab = model.get_input_embeddings().num_embeddings
    blocks = torch.randint(0, vocab, (args.batch, args.block_size),
                           generator=torch.Generator().manual_seed(0))
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cfg = TrainParams(steps=1, batch_size=args.batch, lr=2e-4, min_lr=2e-5, warmup_steps=0,
                      eval_every=1, eval_blocks=1, loss_chunk=args.child_chunk or None)
    started = time.perf_counter()
    train_lm(model, blocks, blocks[:1], cfg, seed=0, bf16=bf16_enabled("auto",
                                                                        torch.device("cpu")))
    return {"loss_chunk": cfg.loss_chunk, "loaded_bytes": loaded,
            "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "seconds": round(time.perf_counter() - started, 1),
            "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/finetune_memory.json")
    parser.add_argument("--child-chunk", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_chunk is not None:
        print(json.dumps(child(args)))
        return 0
    runs = {}
    for name, chunk in (("whole", 0), ("chunked", args.chunk)):
        done = subprocess.run([sys.executable, __file__, "--batch", str(args.batch),
                               "--block-size", str(args.block_size), "--child-chunk", str(chunk)],
                              capture_output=True, text=True, check=True)
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
        r = runs[name]
        print(f"{name:<8} peak {r['peak_bytes'] / 2**20:8.0f} MiB  above model "
              f"{(r['peak_bytes'] - r['loaded_bytes']) / 2**20:8.0f} MiB  {r['seconds']} s",
              flush=True)
    result = {"benchmark": "finetune_memory", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "batch": args.batch, "block_size": args.block_size, "runs": runs,
              "peak_ratio_whole_over_chunked": round(runs["whole"]["peak_bytes"]
                                                     / runs["chunked"]["peak_bytes"], 3)}
    write_json(args.out, result)
    print(json.dumps({"peak_ratio_whole_over_chunked": result["peak_ratio_whole_over_chunked"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
