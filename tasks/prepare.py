"""prepare: corpus -> cleaned documents, document-level split, tokenizer, token blocks.

For model.arch seq2seq each block of data.block_size text tokens becomes one span-corruption
example, stored packed as [source | target] rows in the same Parquet files, with task.json
saying where the source ends.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from gradprune.config import Params, span_counts
from gradprune.data import (
    TASK_FILE,
    CorpusError,
    add_seq2seq_tokens,
    clean_documents,
    load_documents,
    load_tokenizer,
    sentinel_tokens,
    span_corruption_examples,
    split_documents,
    token_blocks,
    train_bpe_tokenizer,
    write_blocks,
)
from gradprune.io import atomic_dir, write_json
from gradprune.models.sources import load_source_tokenizer
from tasks.stage import DATA, Stage, stage_main

OUT = DATA / "prepare"
SPLITS = ("train", "val", "test")


def too_small_fix(split: str, cfg) -> str:
    """What makes a split that holds no block larger. Train gets what val and test leave, so a
    larger val_fraction shrinks it: its fix is lowering the other two."""
    if split == "train":
        grow = (f"lower data.val_fraction + data.test_fraction (now {cfg.val_fraction} + "
                f"{cfg.test_fraction}) to leave train more documents")
    else:
        grow = f"raise data.{split}_fraction (now {getattr(cfg, f'{split}_fraction')})"
    more = (f", raise data.max_documents (now {cfg.max_documents})"
            if cfg.max_documents is not None else "")
    return f"use a larger corpus, {grow}{more}, or lower data.block_size"


def run(params: Params, stage: Stage) -> dict:
    cfg = params.data
    raw, checksum = load_documents(cfg.source, cfg.text_field)
    documents = clean_documents(raw)
    if cfg.max_documents is not None:
        documents = documents[: cfg.max_documents]
    splits = split_documents(documents, cfg.val_fraction, cfg.test_fraction, params.seed)

    if cfg.tokenizer == "bpe":
        tokenizer = train_bpe_tokenizer(splits["train"], cfg.vocab_size)
    elif cfg.tokenizer == "model":
        tokenizer = load_source_tokenizer(params.model.source)
    else:
        tokenizer = load_tokenizer(cfg.tokenizer)
    blocks = {name: token_blocks(docs, tokenizer, cfg.block_size) for name, docs in splits.items()}
    for name in SPLITS:
        if len(blocks[name]) == 0:
            raise CorpusError(
                f"data.source: the {name} split of {cfg.source} holds fewer than "
                f"data.block_size={cfg.block_size} tokens; {too_small_fix(name, cfg)}")
    task = None
    if params.model.arch == "seq2seq":
        blocks, task = seq2seq_task(params, tokenizer, blocks)

    with atomic_dir(OUT) as out:
        tokenizer.save_pretrained(out / "tokenizer")
        if task is not None:
            write_json(out / TASK_FILE, task)
        corpus = pa.table({
            "split": [name for name in SPLITS for _ in splits[name]],
            "text": [doc for name in SPLITS for doc in splits[name]]})
        pq.write_table(corpus, out / "corpus.parquet")
        for name in SPLITS:
            write_blocks(out / f"{name}.parquet", blocks[name])

    return {
        "source": cfg.source,
        "source_sha256": checksum,
        "documents_raw": len(raw),
        "documents": {name: len(splits[name]) for name in SPLITS},
        "tokens": {name: int(blocks[name].numel()) for name in SPLITS},
        "blocks": {name: len(blocks[name]) for name in SPLITS},
        "block_size": cfg.block_size,
        "vocab_size": len(tokenizer),
        **({"task": task} if task else {}),
    }


def seq2seq_task(params: Params, tokenizer, text_blocks: dict) -> tuple[dict, dict]:
    """Span-corruption examples of every split's text blocks, and the task's layout."""
    cfg = params.data.span_corruption
    noise, spans = span_counts(params.data.block_size, cfg.noise_density, cfg.mean_span_length)
    add_seq2seq_tokens(tokenizer, spans)
    sentinels = tokenizer.convert_tokens_to_ids(sentinel_tokens(spans))
    examples = {name: span_corruption_examples(text_blocks[name], noise, spans, sentinels,
                                               tokenizer.eos_token_id, params.seed + i)
                for i, name in enumerate(SPLITS)}
    source_length = params.data.block_size - noise + spans + 1
    return examples, {
        "task": "span_corruption", "source_length": source_length,
        "target_length": noise + spans + 1, "masked_tokens": noise, "spans": spans,
        "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
        # EOS starts the decoder, as in BART: decoder key padding comes from pad tokens, so
        # the start token must not be the pad token (T5's choice).
        "decoder_start_token_id": tokenizer.eos_token_id}


if __name__ == "__main__":
    stage_main("prepare", run)
