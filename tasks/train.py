"""train: the dense model (model.arch: the LLaMA-architecture decoder or the encoder-decoder),
trained from scratch on the prepared blocks, or a pretrained model.source after train.steps of
continued pretraining (possibly none)."""

from __future__ import annotations

import math
import time

from gradprune.config import Params
from gradprune.data import TASK_FILE, load_tokenizer, read_blocks
from gradprune.evaluation.perplexity import parameter_counts, unigram_perplexity
from gradprune.export.card import save_hf_folder
from gradprune.io import atomic_dir, read_json
from gradprune.models.llama import bf16_enabled, build_llama, build_seq2seq, check_vocab
from gradprune.models.sources import load_source_model
from gradprune.training.loop import mean_loss, train_lm
from tasks.stage import DATA, Stage, stage_main

OUT = DATA / "train"
PREPARED = DATA / "prepare"


def run(params: Params, stage: Stage) -> dict:
    cfg = params.train
    device = stage.device
    tokenizer = load_tokenizer(PREPARED / "tokenizer")
    train_blocks = read_blocks(PREPARED / "train.parquet")
    val_blocks = read_blocks(PREPARED / "val.parquet")
    # unigram_perplexity scores every position of a block but the first: for packed seq2seq
    # rows, from the source's last position on, which is exactly the target tokens.
    scored_from = 0
    if params.model.arch == "seq2seq":
        task = read_json(PREPARED / TASK_FILE)
        model = build_seq2seq(params.model, len(tokenizer), task, params.seed).to(device)
        scored_from = task["source_length"] - 1
    elif params.model.source == "scratch":
        model = build_llama(params.model, len(tokenizer), train_blocks.shape[1],
                            tokenizer.eos_token_id, params.seed).to(device)
    else:
        model, _ = load_source_model(params.model.source, device)
        check_vocab(model, tokenizer, params.model.source)
    bf16 = bf16_enabled(cfg.bf16, device)

    started = time.perf_counter()
    curve = train_lm(model, train_blocks, val_blocks, cfg, params.seed, bf16) if cfg.steps else []
    seconds = time.perf_counter() - started

    with atomic_dir(OUT) as out:
        save_hf_folder(model, tokenizer, out / "model")
    stage.write_plot("train_curve", [vars(p) for p in curve])
    stage.log_curve([vars(p) for p in curve], prefix="curve/")
    stage.log_artifacts(OUT / "model", "model")

    val_loss = curve[-1].val_loss if curve else mean_loss(
        model, val_blocks[: cfg.eval_blocks], cfg.batch_size, bf16)
    tokens = cfg.steps * cfg.batch_size * train_blocks.shape[1]
    return {
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss),
        "unigram_val_perplexity": unigram_perplexity(
            train_blocks[:, scored_from:], val_blocks[: cfg.eval_blocks, scored_from:],
            len(tokenizer)),
        "train_tokens": tokens,
        "epochs": round(cfg.steps * cfg.batch_size / len(train_blocks), 3),
        "tokens_per_second": round(tokens / seconds, 1),
        "bf16": bf16,
        **parameter_counts(model),
    }


if __name__ == "__main__":
    stage_main("train", run)
