"""The encoder-decoder Transformer: masks, attention, save/load, statistics, every criterion and
pattern on its weights, span corruption, greedy decoding, and the params it refuses."""

from __future__ import annotations

import pytest
import torch
from conftest import deep_merge, micro_params
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradprune.config import MaskParams, ParamError, params_from_dict, span_counts
from gradprune.data import corrupt_spans, span_corruption_examples
from gradprune.models.llama import load_model, prunable_linears
from gradprune.models.seq2seq import (
    LinearProjectionAttention,
    Seq2SeqConfig,
    Seq2SeqTransformer,
    causal_mask,
    exact_match,
    greedy_decode,
)
from gradprune.pruning.criteria import CRITERIA
from gradprune.pruning.masks import apply_masks
from gradprune.pruning.prune import apply_pruning, prune
from gradprune.pruning.stats import STATISTICS, collect_gradient_stats, requested_statistics

PAD, EOS = 1, 0
INCLUDE = ("encoder.layers.*", "decoder.layers.*")
T, F = True, False


def tiny(source_length=6, target_length=4, tie=False, seed=0, hidden=8) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    return Seq2SeqTransformer(Seq2SeqConfig(
        vocab_size=40, hidden=hidden, heads=2, layers=1, ffn=16, source_length=source_length,
        target_length=target_length, pad_token_id=PAD, eos_token_id=EOS,
        decoder_start_token_id=EOS, tie_embeddings=tie)).eval()


def rows(n=4, width=10, seed=0) -> torch.Tensor:
    return torch.randint(2, 40, (n, width), generator=torch.Generator().manual_seed(seed))


# --- attention and masks ----------------------------------------------------------------------

def test_attention_equals_torch_multihead_attention_under_causal_and_padding_masks():
    torch.manual_seed(0)
    ours = LinearProjectionAttention(8, 2)
    stock = nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        stock.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight,
                                              ours.v_proj.weight]))
        stock.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias,
                                            ours.v_proj.bias]) + 0.1)
        for proj in (ours.q_proj, ours.k_proj, ours.v_proj):
            proj.bias.add_(0.1)
        stock.out_proj.load_state_dict(ours.out_proj.state_dict())
    x, memory = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    keys_padded = torch.tensor([[F] * 7, [F] * 4 + [T] * 3])
    got = ours(x, memory, memory, key_padding_mask=keys_padded)[0]
    want = stock(x, memory, memory, key_padding_mask=keys_padded, need_weights=False)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    def additive(mask):
        return torch.zeros(mask.shape).masked_fill(mask, float("-inf"))

    padded = torch.tensor([[F] * 5, [F] * 3 + [T] * 2])
    for mask, padded in ((causal_mask(5), padded), (additive(causal_mask(5)), additive(padded))):
        got = ours(x, x, x, attn_mask=mask, key_padding_mask=padded)[0]
        want = stock(x, x, x, attn_mask=mask, key_padding_mask=padded, need_weights=False)[0]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_decoder_position_cannot_see_the_future():
    model = tiny()
    batch = rows(2)
    before = model(input_ids=batch).logits
    for j in range(4):  # target token j is the decoder's input at position j + 1
        changed = batch.clone()
        changed[:, 6 + j] = (changed[:, 6 + j] + 1 - 2) % 38 + 2
        after = model(input_ids=changed).logits
        torch.testing.assert_close(after[:, :j + 1], before[:, :j + 1], rtol=0, atol=0)
        if j + 1 < 4:
            assert not torch.allclose(after[:, j + 1], before[:, j + 1])


def test_appended_padding_leaves_real_positions_unchanged():
    short = tiny(source_length=4, target_length=3)
    long = tiny(source_length=7, target_length=5)
    long.load_state_dict(short.state_dict())
    source, target = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10, EOS]])
    padded = torch.cat([source, torch.full((1, 3), PAD), target, torch.full((1, 2), PAD)], dim=1)
    out_short = short(input_ids=torch.cat([source, target], 1),
                      labels=torch.cat([source, target], 1))
    out_long = long(input_ids=padded, labels=padded)
    torch.testing.assert_close(out_long.logits[:, :3], out_short.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(long.encode(padded[:, :7])[0][:, :4], short.encode(source)[0],
                               rtol=0, atol=1e-5)
    assert out_long.target_tokens == out_short.target_tokens == 3
    torch.testing.assert_close(out_long.loss, out_short.loss, rtol=0, atol=1e-5)
    # The same extra tokens as real tokens do change the outputs: the masks are what hide them.
    unmasked = padded.masked_fill(padded == PAD, 11)
    assert not torch.allclose(long(input_ids=unmasked).logits[:, :3], out_short.logits,
                              atol=1e-3)


# --- save, load, tie --------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True])
def test_save_and_reload_gives_the_same_model(tmp_path, tie):
    from safetensors.torch import load_file

    model = tiny(tie=tie)
    model.save_pretrained(tmp_path)
    again = load_model(tmp_path)
    assert isinstance(again, Seq2SeqTransformer) and again.config == model.config
    batch = rows()
    torch.testing.assert_close(again(input_ids=batch).logits, model(input_ids=batch).logits,
                               rtol=0, atol=0)
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert ("output_projection.weight" in stored) is not tie
    if tie:  # the output projection is the embedding
        with torch.no_grad():
            again.embed.weight[5] += 1
        assert not torch.equal(again(input_ids=batch).logits[..., 5],
                               model(input_ids=batch).logits[..., 5])


# --- prunable set and statistics --------------------------------------------------------------

def test_prunable_linears_are_every_attention_and_ffn_matrix_of_both_stacks():
    names = set(prunable_linears(tiny(), INCLUDE))
    attention = [f"{p}_proj" for p in "qkvo"]
    attention[-1] = "out_proj"
    assert names == {
        *[f"encoder.layers.0.self_attn.{p}" for p in attention],
        *[f"decoder.layers.0.self_attn.{p}" for p in attention],
        *[f"decoder.layers.0.multihead_attn.{p}" for p in attention],
        *[f"{stack}.layers.0.linear{i}" for stack in ("encoder", "decoder") for i in (1, 2)]}


def test_statistics_are_the_gradient_and_the_inputs_each_matrix_sees():
    model = tiny()
    linears = prunable_linears(model, INCLUDE)
    block = rows(1)
    stats, loss = collect_gradient_stats(model, linears, block, bf16=False)

    model.zero_grad()
    out = model(input_ids=block, labels=block)
    out.loss.backward()
    assert loss == pytest.approx(out.loss.item())
    for name, layer in linears.items():
        torch.testing.assert_close(stats[name]["grad_mean"], layer.weight.grad, rtol=0, atol=1e-7)
    # Cross-attention keys and values read the encoder memory, every source position.
    memory = model.encode(block[:, :6])[0].detach()
    for proj in ("k_proj", "v_proj"):
        torch.testing.assert_close(stats[f"decoder.layers.0.multihead_attn.{proj}"]["act_norm"],
                                   memory[0].norm(dim=0), rtol=1e-5, atol=1e-6)
    # Its queries read the decoder's states: one per target position.
    assert not torch.allclose(stats["decoder.layers.0.multihead_attn.q_proj"]["act_norm"],
                              memory[0].norm(dim=0))


@pytest.fixture(scope="module")
def calibrated():
    model = tiny(hidden=16)
    linears = prunable_linears(model, INCLUDE)
    stats, _ = collect_gradient_stats(model, linears, rows(4, seed=1), bf16=False,
                                      statistics=STATISTICS)
    return model, stats


KINDS = {"encoder self-attention": "encoder.layers.0.self_attn.",
         "decoder self-attention": "decoder.layers.0.self_attn.",
         "cross-attention": "decoder.layers.0.multihead_attn.",
         "FFN": ".linear"}


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_and_pattern_prunes_every_kind_of_weight(calibrated, criterion, pattern):
    model, stats = calibrated
    pruned = prune(model, stats, MaskParams(criterion=criterion, pattern=pattern, sparsity=0.5),
                   seed=3, n_blocks=4)
    masks = pruned.masks
    assert set(masks) == set(stats)
    if pattern == "2:4":
        for mask in masks.values():
            assert bool((mask.reshape(-1, 4).sum(dim=1) == 2).all())
    elif criterion == "sparsegpt":  # per matrix
        for mask in masks.values():
            assert int(mask.sum()) * 2 == mask.numel()
    else:  # global
        assert sum(int(m.sum()) for m in masks.values()) * 2 == sum(m.numel() for m in
                                                                    masks.values())
    for kind, part in KINDS.items():
        assert any(part in name and not bool(mask.all()) for name, mask in masks.items()), kind
    pruned_model = apply_pruning(tiny(hidden=16), pruned)
    modules = dict(pruned_model.named_modules())
    for name, mask in masks.items():
        assert bool((modules[name].weight[~mask] == 0).all()), name
    batch = rows(2, seed=2)
    assert torch.isfinite(pruned_model(input_ids=batch, labels=batch).loss)


def test_per_row_scope_prunes_half_of_every_row(calibrated):
    model, stats = calibrated
    masks = prune(model, stats, MaskParams(criterion="wanda", scope="per_row", sparsity=0.5),
                  seed=0, n_blocks=4).masks
    for mask in masks.values():
        assert bool((mask.sum(dim=1) * 2 == mask.shape[1]).all())


# --- known answers on one seq2seq weight ------------------------------------------------------

CROSS_KEYS = "decoder.layers.0.multihead_attn.k_proj"


def test_known_answer_masks_on_the_cross_attention_keys():
    model = tiny()
    row = torch.tensor([1.0, -4.0, 2.0, 3.0, 0.5, -0.25, 7.0, -6.0])
    with torch.no_grad():
        model.get_submodule(CROSS_KEYS).weight.copy_(torch.stack([row * (i + 1) for i in range(8)]))
    stats = {CROSS_KEYS: {"grad_mean": torch.tensor([0.5, -0.125, 2.0, -1.0, 0.0, 0.25, -0.75,
                                                     0.375]).repeat(8, 1)}}
    # magnitude 2:4: of |1 -4 2 3| keep -4 and 3, of |0.5 -0.25 7 -6| keep 7 and -6, every row
    two_four = prune(model, stats, MaskParams(criterion="magnitude", pattern="2:4",
                                              sparsity=0.5), 0, 1).masks[CROSS_KEYS]
    assert two_four.tolist() == [[F, T, F, T, F, F, T, T]] * 8
    # the seed's rule |dL/dw| > tau with tau = 0.3: 0.5, 2, 1, 0.75, 0.375 pass
    seed_rule = prune(model, stats, MaskParams(criterion="gradient", tau=0.3, sparsity=None),
                      0, 1).masks[CROSS_KEYS]
    assert seed_rule.tolist() == [[T, F, T, T, F, F, T, T]] * 8
    # masks.exclude keeps a Linear dense under the threshold rule too
    assert prune(model, stats, MaskParams(criterion="gradient", tau=0.3, sparsity=None,
                                          exclude=("*.multihead_attn.*",)), 0, 1
                 ).masks[CROSS_KEYS].all()
    apply_masks(model, {CROSS_KEYS: seed_rule})
    weight = model.get_submodule(CROSS_KEYS).weight
    assert weight[:, [1, 4, 5]].eq(0).all() and weight[:, [0, 2, 3, 6, 7]].ne(0).all()


def test_seed_rule_on_real_gradients_of_a_seq2seq_weight():
    model = tiny()
    linears = prunable_linears(model, INCLUDE)
    block = rows(1, seed=4)
    stats, _ = collect_gradient_stats(model, linears, block, bf16=False)
    model(input_ids=block, labels=block).loss.backward()
    grad = model.get_submodule(CROSS_KEYS).weight.grad.abs()
    tau = grad.median().item()
    masks = prune(model, stats, MaskParams(criterion="gradient", tau=tau, sparsity=None), 0, 1).masks
    assert torch.equal(masks[CROSS_KEYS], grad > tau)


# --- greedy decoding and exact match ----------------------------------------------------------

def test_greedy_decoding_is_the_argmax_of_its_own_teacher_forcing_and_exact_match_counts():
    model = tiny()
    source = rows(5, width=6, seed=5)
    decoded = greedy_decode(model, source, bf16=False)
    assert decoded.shape == (5, 4)
    packed = torch.cat([source, decoded], dim=1)
    torch.testing.assert_close(model(input_ids=packed).logits.argmax(-1), decoded, rtol=0, atol=0)
    assert exact_match(model, packed, batch_size=2, bf16=False) == 1.0
    wrong = packed.clone()
    wrong[3, 7] = (wrong[3, 7] + 1) % 40
    assert exact_match(model, wrong, batch_size=2, bf16=False) == 0.8
    # a pad-terminated target is compared on its real tokens only
    shorter = packed.clone()
    shorter[0, 8:] = PAD
    shorter[1, 8:] = PAD
    shorter[1, 7] = (shorter[1, 7] + 1) % 40
    assert exact_match(model, shorter, batch_size=5, bf16=False) == 0.8


# --- span corruption --------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(length=st.integers(4, 80), density=st.floats(0.05, 0.6), mean_span=st.floats(1, 5),
       seed=st.integers(0, 2 ** 16))
def test_span_corruption_hides_exactly_the_spans_and_reconstructs(length, density, mean_span,
                                                                 seed):
    noise, spans = span_counts(length, density, mean_span)
    if length - noise < spans:
        return  # refused by the params check
    tokens = list(range(100, 100 + length))
    sentinels = list(range(10, 10 + spans))
    source, target = corrupt_spans(tokens, noise, spans, sentinels, EOS,
                                   torch.Generator().manual_seed(seed))
    assert len(source) == length - noise + spans + 1 and len(target) == noise + spans + 1
    assert source[-1] == target[-1] == EOS
    assert [t for t in source if t in sentinels] == [t for t in target if t in sentinels] == \
        sentinels
    # Putting each sentinel's tokens back where it stands gives the text back.
    hidden, current = {}, None
    for t in target[:-1]:
        if t in sentinels:
            current = t
            hidden[t] = []
        else:
            hidden[current].append(t)
    assert all(hidden.values())
    restored = [u for t in source[:-1] for u in (hidden[t] if t in sentinels else [t])]
    assert restored == tokens


def test_span_corruption_examples_are_seeded():
    blocks = torch.arange(3 * 20).view(3, 20)
    a = span_corruption_examples(blocks, 6, 2, [90, 91], EOS, seed=1)
    assert a.shape == (3, 20 + 2 * 2 + 2)
    assert torch.equal(a, span_corruption_examples(blocks, 6, 2, [90, 91], EOS, seed=1))
    assert not torch.equal(a, span_corruption_examples(blocks, 6, 2, [90, 91], EOS, seed=2))


# --- params -----------------------------------------------------------------------------------

SEQ2SEQ = {"model": {"arch": "seq2seq"}, "gradients": {"include": list(INCLUDE)},
           "compare": {"zeroshot": False}}


@pytest.mark.parametrize("changes, key", [
    ({"masks": {"pattern": "structured", "criterion": "taylor"}}, "masks.pattern"),
    ({"compare": {"criteria": ["taylor"], "patterns": ["unstructured", "structured"]}},
     "compare.patterns[1]"),
    ({"gradients": {"include": ["model.layers.*"]}}, "gradients.include"),
    ({"model": {"source": "smollm2"}, "data": {"tokenizer": "model"}, "train": {"steps": 0}},
     "model.source"),
    ({"data": {"span_corruption": {"noise_density": 1.5}}}, "data.span_corruption.noise_density"),
    ({"data": {"span_corruption": {"mean_span_length": 0.5}}},
     "data.span_corruption.mean_span_length"),
    ({"data": {"block_size": 8, "span_corruption": {"noise_density": 0.9,
                                                    "mean_span_length": 1}}},
     "data.span_corruption.noise_density"),
    ({"evaluate": {"exact_match_limit": 0}}, "evaluate.exact_match_limit"),
    ({"compare": {"zeroshot": True}}, "compare.zeroshot"),
])
def test_seq2seq_params_refused_name_their_key(changes, key):
    with pytest.raises(ParamError) as err:
        params_from_dict(deep_merge(deep_merge(micro_params(), SEQ2SEQ), changes))
    assert err.value.key == key
    if key == "masks.pattern":
        assert "'unstructured' or 'N:M'" in str(err.value)


def test_seq2seq_micro_params_are_valid():
    params = params_from_dict(deep_merge(micro_params(), SEQ2SEQ))
    assert params.model.arch == "seq2seq"


def test_calibration_auto_prunes_a_seq2seq_model_by_sparsegpt_in_one_pass():
    params = params_from_dict(deep_merge(deep_merge(micro_params(), SEQ2SEQ),
                                         {"masks": {"criterion": "sparsegpt"}}))
    assert params.masks.calibration == "auto"
    assert not params.masks.layer_by_layer(params.model.arch)
    assert "hessian" in requested_statistics(params)
    with pytest.raises(ParamError) as err:
        params_from_dict(deep_merge(deep_merge(micro_params(), SEQ2SEQ),
                                    {"masks": {"calibration": "sequential"}}))
    assert err.value.key == "masks.calibration"
