"""Corpus loading, cleaning, splitting, tokenizers, token blocks, and atomic folders."""

from __future__ import annotations

import hashlib
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gradprune.data import (
    EOS_TOKEN,
    CorpusError,
    clean_documents,
    load_documents,
    read_blocks,
    split_documents,
    token_blocks,
    train_bpe_tokenizer,
    write_blocks,
)
from gradprune.evaluation.perplexity import unigram_perplexity
from gradprune.io import ArtifactError, atomic_dir

SENTENCES = [
    "The cat sat on the mat.",
    "A dog ran in the park, and the cat watched.",
    "Markets rose on Tuesday as investors cheered the news.",
    "The park was quiet after the rain.",
    "Investors watched the markets closely.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(SENTENCES, vocab_size=300)


# --- cleaning and splitting ------------------------------------------------------------------

def test_clean_documents():
    raw = ["  Hello\t world \n\n again ", "", "   \n\t", "Hello world again", "second  doc",
           "second doc\n", "third"]
    assert clean_documents(raw) == ["Hello world again", "second doc", "third"]
    assert clean_documents([]) == []


def test_split_documents_deterministic_disjoint_covering():
    docs = [f"document {i}" for i in range(40)]
    split = split_documents(docs, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert split == split_documents(docs, 0.1, 0.2, seed=3)
    assert split != split_documents(docs, 0.1, 0.2, seed=4)
    assert [len(split[k]) for k in ("train", "val", "test")] == [28, 4, 8]
    parts = [set(split[k]) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == set(docs)
    for part in split.values():  # corpus order is kept inside each split
        assert part == sorted(part, key=docs.index)


def test_split_documents_minimum_and_too_few():
    split = split_documents(["a", "b", "c"], 0.01, 0.01, seed=0)  # at least one each
    assert [len(split[k]) for k in ("train", "val", "test")] == [1, 1, 1]
    with pytest.raises(CorpusError, match="2 documents after cleaning cannot fill"):
        split_documents(["a", "b"], 0.1, 0.1, seed=0)


# --- loading ---------------------------------------------------------------------------------

def _sha(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for c in chunks:
        digest.update(c)
    return digest.hexdigest()


def test_load_txt_blank_line_separated(tmp_path):
    path = tmp_path / "corpus.txt"
    data = "First doc\nline two\n\nSecond doc\r\n\r\nThird\n\n\n".encode()
    path.write_bytes(data)
    docs, checksum = load_documents(str(path))
    assert clean_documents(docs) == ["First doc line two", "Second doc", "Third"]
    assert checksum == _sha(data)


def test_load_jsonl_csv_parquet(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"body": "from jsonl", "id": 1}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    (tmp_path / "b.csv").write_text('id,body\n1,"from csv, quoted"\n2,\n')
    pq.write_table(pa.table({"body": ["from parquet", None]}), tmp_path / "c.parquet")
    assert load_documents(str(tmp_path / "a.jsonl"), "body")[0] == ["from jsonl", "two"]
    assert load_documents(str(tmp_path / "b.csv"), "body")[0] == ["from csv, quoted", ""]
    assert load_documents(str(tmp_path / "c.parquet"), "body")[0] == ["from parquet", ""]


def test_load_folder_in_sorted_order_recursively(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.jsonl").write_text('{"text": "ay"}\n')
    (tmp_path / "sub" / "c.csv").write_text("text\nsea\n")
    (tmp_path / "notes.md").write_text("ignored in a folder")
    docs, checksum = load_documents(str(tmp_path))
    assert docs == ["ay", "bee", "sea"]
    assert checksum == _sha(b'{"text": "ay"}\n', b"bee", b"text\nsea\n")


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(CorpusError, match=f"{missing} does not exist"):
        load_documents(str(missing))
    wrong = tmp_path / "corpus.md"
    wrong.write_text("text")
    with pytest.raises(CorpusError, match=f"{wrong} has suffix '.md'; allowed: .txt, .jsonl"):
        load_documents(str(wrong))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match=f"{empty} holds no"):
        load_documents(str(empty))
    (tmp_path / "x.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(CorpusError, match=f"{tmp_path / 'x.jsonl'}: a record has no field 'text'"):
        load_documents(str(tmp_path / "x.jsonl"))
    (tmp_path / "x.csv").write_text("body\nhello\n")
    with pytest.raises(CorpusError, match=f"{tmp_path / 'x.csv'}: a record has no field 'text'"):
        load_documents(str(tmp_path / "x.csv"))
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(CorpusError, match=f"{tmp_path / 'x.parquet'}: no column 'text'"):
        load_documents(str(tmp_path / "x.parquet"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(CorpusError, match=f"{tmp_path / 'bad.jsonl'}: cannot be read as .jsonl"):
        load_documents(str(tmp_path / "bad.jsonl"))


# --- tokenizer and blocks --------------------------------------------------------------------

def test_bpe_tokenizer_deterministic_and_has_eos(tokenizer):
    again = train_bpe_tokenizer(SENTENCES, vocab_size=300)
    assert tokenizer.get_vocab() == again.get_vocab()
    assert tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.eos_token_id == tokenizer.get_vocab()[EOS_TOKEN]
    assert 256 < len(tokenizer) <= 300
    ids = tokenizer("the cat watched", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "the cat watched"


def test_token_blocks_eos_after_each_doc_and_tail_dropped(tokenizer):
    docs = SENTENCES[:3]
    eos = tokenizer.eos_token_id
    stream = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
    assert stream.count(eos) == 3
    block_size = 8
    blocks = token_blocks(docs, tokenizer, block_size)
    n = len(stream) // block_size
    assert len(stream) % block_size != 0  # the tail below really is dropped
    assert blocks.shape == (n, block_size)
    assert blocks.dtype == torch.int32
    assert blocks.reshape(-1).tolist() == stream[: n * block_size]
    # one block as long as the whole stream, and none when the stream is shorter
    assert token_blocks(docs, tokenizer, len(stream)).reshape(-1).tolist() == stream
    assert token_blocks(docs, tokenizer, len(stream) + 1).shape == (0, len(stream) + 1)


def test_write_read_blocks_round_trip(tmp_path, tokenizer):
    blocks = token_blocks(SENTENCES, tokenizer, 8)
    path = tmp_path / "blocks.parquet"
    write_blocks(path, blocks)
    back = read_blocks(path)
    assert back.dtype == torch.long
    assert torch.equal(back, blocks.long())


def test_read_blocks_errors_name_path(tmp_path):
    with pytest.raises(ArtifactError, match=f"{tmp_path / 'no.parquet'}: token blocks missing"):
        read_blocks(tmp_path / "no.parquet")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(ArtifactError, match=f"{bad}: unreadable token blocks \\(ArrowInvalid"):
        read_blocks(bad)


def test_unigram_perplexity_hand_computed():
    # train counts of ids 0..3: [2, 1, 1, 0] + 1 -> p = [3/8, 2/8, 2/8, 1/8]
    train = torch.tensor([[0, 0, 1, 2]])
    # scored targets (every position but the first): 0, 1, 3, 3
    test = torch.tensor([[3, 0, 1], [2, 3, 3]])
    expected = math.exp(-(math.log(3 / 8) + math.log(2 / 8) + 2 * math.log(1 / 8)) / 4)
    assert expected == pytest.approx((8 / 3 * 4 * 8 * 8) ** 0.25)  # (2048/3)^(1/4) = 5.11154...
    assert unigram_perplexity(train, test, vocab_size=4) == pytest.approx(expected)
    assert unigram_perplexity(train, test, vocab_size=4) == pytest.approx(5.1115448, rel=1e-7)


# --- atomic folders --------------------------------------------------------------------------

def test_atomic_dir_leaves_nothing_when_body_raises(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_keeps_old_folder_on_failure_and_replaces_on_success(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyError):
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("new")
            raise KeyError("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]

    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and list(tmp.iterdir()) == []
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert (target / "new.txt").read_text() == "new"
