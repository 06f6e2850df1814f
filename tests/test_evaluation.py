"""Sliding-window perplexity, the papers' WikiText-2 protocol, and the speed and sparse-kernel
measurements."""

from __future__ import annotations

import math

import pytest
import torch

from gradprune.config import ModelParams
from gradprune.evaluation.perplexity import (
    paper_perplexity,
    read_test_text,
    sliding_window_perplexity,
    window_spans,
)
from gradprune.evaluation.speed import measure_speed, sparse_kernel_speed, weight_bytes
from gradprune.models.llama import build_llama
from gradprune.training.loop import mean_loss

CONTEXT = 16
VOCAB = 64


def _model(seed: int = 0):
    cfg = ModelParams(layers=2, hidden=32, heads=4, kv_heads=2, ffn=48)
    return build_llama(cfg, vocab_size=VOCAB, context=64, eos_token_id=0, seed=seed).eval()


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _scored_positions(n: int, context: int, stride: int) -> list[int]:
    return [p for _, end, first in window_spans(n, context, stride) for p in range(first, end)]


@pytest.mark.parametrize("n,context,stride", [(100, 16, 4), (100, 16, 15), (7, 16, 4),
                                              (33, 8, 1), (64, 16, 16)])
def test_window_spans_respect_context_and_score_each_token_at_most_once(n, context, stride):
    spans = window_spans(n, context, stride)
    positions = _scored_positions(n, context, stride)
    assert len(positions) == len(set(positions))
    assert all(end - begin == min(context, n) for begin, end, _ in spans)
    assert all(begin < first for begin, _, first in spans)
    if stride < context:
        assert positions == list(range(1, n))
        # every token after the first window keeps at least context - stride tokens of history
        assert all(first - begin >= context - stride for begin, _, first in spans[1:])
    else:
        assert positions == [p for p in range(1, n) if p % context]


def test_window_spans_reject_bad_settings():
    with pytest.raises(ValueError, match="stride"):
        window_spans(100, 16, 17)
    with pytest.raises(ValueError, match="stride"):
        window_spans(100, 16, 0)
    with pytest.raises(ValueError, match="2 tokens"):
        window_spans(1, 16, 4)


def test_sliding_window_with_stride_equal_to_context_is_block_perplexity():
    model, ids = _model(), _tokens(4 * CONTEXT)
    blocks = math.exp(mean_loss(model, ids.view(4, CONTEXT), batch_size=3, bf16=False))
    sliding = sliding_window_perplexity(model, ids, CONTEXT, CONTEXT, batch_size=3, bf16=False)
    assert sliding["perplexity"] == pytest.approx(blocks, rel=1e-5)
    assert sliding["tokens_scored"] == 4 * (CONTEXT - 1)
    assert (sliding["context"], sliding["stride"], sliding["windows"]) == (CONTEXT, CONTEXT, 4)


# A WikiText-style excerpt written for these tests (headings, blank-line paragraphs, @-@).
WIKITEXT_ROWS = [" = Valkyria Rivers = \n", "", " The river rises in the hills and runs 120 @-@ "
                 "kilometres to the sea . Its valley held three mills in 1850 . \n", "",
                 " = = Course = = \n", " It passes two towns , a lake , and the old bridge . \n"]


def _wanda_reference_perplexity(model, ids: torch.Tensor, seqlen: int) -> float:
    """eval_ppl_wikitext of the Wanda repository (lib/eval.py), one window at a time."""
    nsamples, nlls = ids.numel() // seqlen, []
    for i in range(nsamples):
        batch = ids[i * seqlen:(i + 1) * seqlen][None]
        with torch.no_grad():
            logits = model(batch).logits
        loss = torch.nn.CrossEntropyLoss()(logits[:, :-1, :].reshape(-1, logits.size(-1)),
                                           batch[:, 1:].reshape(-1))
        nlls.append(loss.float() * seqlen)
    return torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen)).item()


def test_paper_perplexity_equals_the_wanda_reference_code(tmp_path):
    from gradprune.data import train_bpe_tokenizer

    path = tmp_path / "wiki.test.txt"
    path.write_text("\n\n".join(WIKITEXT_ROWS) * 6, encoding="utf-8")
    text = read_test_text(path)
    assert text == path.read_text(encoding="utf-8")  # a .txt is scored as it is
    tokenizer = train_bpe_tokenizer([text], vocab_size=300)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    assert len(ids) % CONTEXT != 0  # the remainder is dropped, not scored
    cfg = ModelParams(layers=2, hidden=32, heads=4, kv_heads=2, ffn=48)
    model = build_llama(cfg, vocab_size=len(tokenizer), context=64, eos_token_id=0, seed=0).eval()
    result = paper_perplexity(model, ids, CONTEXT, batch_size=3, bf16=False)
    assert result["perplexity"] == pytest.approx(_wanda_reference_perplexity(model, ids, CONTEXT),
                                                 rel=1e-5)
    assert result["windows"] == len(ids) // CONTEXT
    assert result["tokens_scored"] == (len(ids) // CONTEXT) * (CONTEXT - 1)
    assert "non-overlapping windows of 16 tokens" in result["protocol"]
    with pytest.raises(ValueError, match="fewer than one window"):
        paper_perplexity(model, ids[:CONTEXT - 1], CONTEXT, batch_size=3, bf16=False)


def test_read_test_text_joins_a_datasets_split_with_blank_lines(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": WIKITEXT_ROWS})
    joined = "\n\n".join(WIKITEXT_ROWS)
    # a hub snapshot: <config>/test-*.parquet beside the train split, which is not read
    snapshot = tmp_path / "snapshot" / "wikitext-2-raw-v1"
    snapshot.mkdir(parents=True)
    pq.write_table(table, snapshot / "test-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": ["not this"]}), snapshot / "train-00000-of-00001.parquet")
    assert read_test_text(tmp_path / "snapshot") == joined
    assert read_test_text(snapshot / "test-00000-of-00001.parquet") == joined
    # save_to_disk of a DatasetDict: <folder>/test/data-*.arrow, Arrow stream format
    saved = tmp_path / "saved" / "test"
    saved.mkdir(parents=True)
    with pa.OSFile(str(saved / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    assert read_test_text(tmp_path / "saved") == joined
    with pytest.raises(FileNotFoundError, match="no test text found"):
        read_test_text(tmp_path / "snapshot" / "missing.txt")
    pq.write_table(pa.table({"sentence": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        read_test_text(tmp_path / "other.parquet")


def test_sliding_window_scores_every_token_once_with_bounded_history():
    model, ids, stride = _model(), _tokens(50), 5
    result = sliding_window_perplexity(model, ids, CONTEXT, stride, batch_size=4, bf16=False)
    assert result["tokens_scored"] == len(ids) - 1
    # token-by-token reference: position p is predicted from ids[max(0, e - CONTEXT):p], e the
    # end of the window that scores it
    total = 0.0
    for begin, end, first in window_spans(len(ids), CONTEXT, stride):
        for p in range(first, end):
            with torch.no_grad():
                logits = model(input_ids=ids[begin:p][None]).logits[0, -1]
            total -= logits.log_softmax(-1)[ids[p]].item()
    assert result["loss"] == pytest.approx(total / (len(ids) - 1), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


def test_measure_speed_reports_every_model_and_batch_size():
    calls = []

    def factory():
        calls.append(1)
        return _model(seed=1)

    report = measure_speed({"dense": _model(), "other": factory}, vocab_size=VOCAB,
                           prompt_len=8, new_tokens=4, batch_sizes=(1, 2), repeats=2)
    assert len(calls) == 1
    assert report["settings"]["batch_sizes"] == [1, 2]
    for name in ("dense", "other"):
        assert report[name]["weight_bytes"] == weight_bytes(_model())
        for b in (1, 2):
            row = report[name][f"batch_{b}"]
            assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
            assert row["peak_bytes"] is None or row["peak_bytes"] >= 0


def test_sparse_kernel_speed_reports_density_and_ratios():
    weight = torch.randn(64, 128)
    weight[torch.rand(64, 128, generator=torch.Generator().manual_seed(0)) < 0.9] = 0
    result = sparse_kernel_speed(weight, tokens=16, repeats=2)
    assert result["density"] == pytest.approx((weight != 0).float().mean().item())
    for key in ("dense_masked_s", "dense_filled_s", "csr_s", "dense_zeros_speedup",
                "csr_speedup"):
        assert result[key] > 0
