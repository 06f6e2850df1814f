"""prepare: corpus -> cleaned documents, document-level split, tokenizer, token blocks."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from gradprune.config import Params
from gradprune.data import (CorpusError, clean_documents, load_documents, load_source_tokenizer,
                            load_tokenizer, split_documents, token_blocks, train_bpe_tokenizer,
                            write_blocks)
from gradprune.io import atomic_dir
from tasks.common import DATA, Stage, stage_main

OUT = DATA / "prepare"
SPLITS = ("train", "val", "test")


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
                f"data.block_size={cfg.block_size} tokens; use a larger corpus (or raise "
                f"data.max_documents / data.{name if name != 'train' else 'val'}_fraction) "
                "or a smaller data.block_size")

    with atomic_dir(OUT) as out:
        tokenizer.save_pretrained(out / "tokenizer")
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
    }


if __name__ == "__main__":
    stage_main("prepare", run)
