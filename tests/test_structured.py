"""Structured pruning: known answers on a hand-sized model, the smaller model against the masked
full-size one, and the smaller model through save_pretrained / from_pretrained."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from gradprune.models.llama import prunable_linears
from gradprune.pruning.masks import apply_masks
from gradprune.pruning.structured import (
    ffn_channel_scores,
    head_group_scores,
    select_structures,
    shape_report,
    shrink_llama,
    structured_masks,
    top_indices,
    uniform_widths,
)

L0 = "model.layers.0"


def tiny_llama(layers=1, hidden=8, heads=4, kv_heads=2, head_dim=2, ffn=8, bias=False,
               tie=False, seed=0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=16, hidden_size=hidden, intermediate_size=ffn,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=head_dim,
                         max_position_embeddings=16, attention_bias=bias, mlp_bias=bias,
                         tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    # Default init is std 0.02: scale up so removed structures change the logits visibly.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def hand_scores() -> dict[str, torch.Tensor]:
    """Zero everywhere but a few entries, so each structure's score can be summed by hand.

    FFN channels (gate row + up row + down column): [3.5, 0, 2, 0, 0, 3, 0, 4].
    KV groups (heads 0,1 | heads 2,3; head_dim 2): group 0 = q 1.0; group 1 = k 0.5 + v 0.5
    + o 0.25 = 1.25.
    """
    model = tiny_llama()
    scores = {n: torch.zeros(m.weight.shape) for n, m in
              prunable_linears(model, ("model.layers.*",)).items()}
    scores[f"{L0}.mlp.gate_proj"][0, 3] = 1.0
    scores[f"{L0}.mlp.gate_proj"][5, 0] = 3.0
    scores[f"{L0}.mlp.up_proj"][0, 1] = 1.0
    scores[f"{L0}.mlp.up_proj"][2, 7] = 2.0
    scores[f"{L0}.mlp.down_proj"][4, 0] = 1.5
    scores[f"{L0}.mlp.down_proj"][0, 7] = 4.0
    scores[f"{L0}.self_attn.q_proj"][3, 2] = 1.0    # row 3: head 1, group 0
    scores[f"{L0}.self_attn.k_proj"][2, 0] = 0.5    # row 2: KV head 1
    scores[f"{L0}.self_attn.v_proj"][3, 5] = 0.5    # row 3: KV head 1
    scores[f"{L0}.self_attn.o_proj"][6, 5] = 0.25   # column 5: head 2, group 1
    return scores


def test_structure_scores_known_answer():
    scores = hand_scores()
    assert ffn_channel_scores(scores, 0).tolist() == [3.5, 0, 2, 0, 0, 3, 0, 4]
    assert head_group_scores(scores, 0, 2).tolist() == [1.0, 1.25]


def test_selection_known_answer_with_ties_to_lower_index():
    config = tiny_llama().config
    keep_ffn, keep_groups = select_structures(hand_scores(), config, ffn_sparsity=0.5,
                                              head_sparsity=0.5, ffn_multiple=2)
    assert keep_ffn[0].tolist() == [0, 2, 5, 7]
    assert keep_groups[0].tolist() == [1]
    # Keeping 5 of 8: channels 1, 3, 4, 6 tie at 0 and the lowest index wins.
    keep_ffn, _ = select_structures(hand_scores(), config, 0.375, 0.0, ffn_multiple=1)
    assert keep_ffn[0].tolist() == [0, 1, 2, 5, 7]
    assert top_indices(torch.tensor([1.0, 2.0, 2.0, 1.0]), 3).tolist() == [0, 1, 2]


def test_uniform_widths_round_to_multiple_and_keep_loadable_groups():
    default = LlamaConfig(hidden_size=256, intermediate_size=688, num_attention_heads=8,
                          num_key_value_heads=4)
    assert uniform_widths(default, 0.5, 0.5, 32) == (352, 2)    # 344 = 10.75 multiples -> 11
    assert uniform_widths(default, 0.0, 0.0, 32) == (688, 4)    # never wider than dense
    assert uniform_widths(default, 0.99, 0.99, 32) == (32, 1)   # at least one of each
    # 3 groups = 6 heads, which 256 does not divide: 2 and 4 are equally near, the larger wins.
    assert uniform_widths(default, 0.5, 0.25, 8) == (344, 4)
    assert uniform_widths(default, 0.5, 0.3, 8) == (344, 2)
    smollm = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3)
    assert uniform_widths(smollm, 0.5, 0.5, 1) == (768, 2)      # 1.5 groups rounds up
    with pytest.raises(ValueError, match="ffn_multiple"):
        uniform_widths(default, 0.5, 0.5, 0)
    with pytest.raises(ValueError, match="sparsities"):
        uniform_widths(default, 1.0, 0.5, 1)


def test_shrink_known_answer():
    model = tiny_llama()
    keep_ffn, keep_groups = {0: torch.tensor([7, 0, 2, 5])}, {0: torch.tensor([1])}
    smaller = shrink_llama(model, keep_ffn, keep_groups)
    # Removed: 4 FFN channels (gate, up rows and down columns of width 8: 96 weights) and one
    # group (4 q rows, 2 k rows, 2 v rows, 4 o columns of width 8: 96 weights).
    assert shape_report(smaller) == {
        "layers": 1, "hidden": 8, "heads": 2, "kv_heads": 1, "head_dim": 2, "ffn": 4,
        "vocab": 16, "parameters": shape_report(model)["parameters"] - 96 - 96}
    big, small = model.model.layers[0], smaller.model.layers[0]
    assert torch.equal(small.self_attn.q_proj.weight, big.self_attn.q_proj.weight[4:8])
    assert torch.equal(small.self_attn.k_proj.weight, big.self_attn.k_proj.weight[2:4])
    assert torch.equal(small.self_attn.v_proj.weight, big.self_attn.v_proj.weight[2:4])
    assert torch.equal(small.self_attn.o_proj.weight, big.self_attn.o_proj.weight[:, 4:8])
    assert torch.equal(small.mlp.up_proj.weight, big.mlp.up_proj.weight[[0, 2, 5, 7]])
    assert torch.equal(small.mlp.down_proj.weight, big.mlp.down_proj.weight[:, [0, 2, 5, 7]])

    masks = structured_masks(model, keep_ffn, keep_groups)
    assert masks[f"{L0}.self_attn.q_proj"][:, 0].tolist() == [False] * 4 + [True] * 4
    assert masks[f"{L0}.self_attn.o_proj"][0].tolist() == [False] * 4 + [True] * 4
    assert masks[f"{L0}.mlp.gate_proj"][:, 0].tolist() == [1, 0, 1, 0, 0, 1, 0, 1]


def test_rejects_uneven_widths_and_missing_scores():
    model = tiny_llama(layers=2)
    groups = {0: torch.tensor([0]), 1: torch.tensor([1])}
    with pytest.raises(ValueError, match="same number"):
        shrink_llama(model, {0: torch.tensor([0, 1]), 1: torch.tensor([0])}, groups)
    with pytest.raises(ValueError, match="distinct"):
        shrink_llama(model, {0: torch.tensor([0, 0]), 1: torch.tensor([0, 1])}, groups)
    with pytest.raises(ValueError, match="does not divide hidden size 8"):
        shrink_llama(tiny_llama(heads=8, kv_heads=4, head_dim=2),
                     {0: torch.arange(4)}, {0: torch.arange(3)})
    with pytest.raises(ValueError, match="layers 0..1"):
        structured_masks(model, {0: torch.tensor([0])}, groups)
    scores = hand_scores()
    del scores[f"{L0}.mlp.down_proj"]
    with pytest.raises(ValueError, match="down_proj"):
        ffn_channel_scores(scores, 0)


@settings(max_examples=25, deadline=None)
@given(layers=st.integers(1, 2), kv_heads=st.integers(1, 3), per_group=st.integers(1, 3),
       head_dim=st.sampled_from([2, 4]), hidden_per_head=st.sampled_from([2, 4]),
       ffn=st.integers(2, 20), ffn_sparsity=st.floats(0, 0.9), head_sparsity=st.floats(0, 0.9),
       multiple=st.sampled_from([1, 2, 4]), bias=st.booleans(), tie=st.booleans(),
       seed=st.integers(0, 2**16))
def test_smaller_model_computes_the_masked_full_size_model(layers, kv_heads, per_group, head_dim,
                                                          hidden_per_head, ffn, ffn_sparsity,
                                                          head_sparsity, multiple, bias, tie,
                                                          seed):
    heads = kv_heads * per_group
    model = tiny_llama(layers, heads * hidden_per_head, heads, kv_heads, head_dim, ffn, bias, tie,
                       seed)
    generator = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(m.weight.shape, generator=generator)
              for n, m in prunable_linears(model, ("model.layers.*",)).items()}
    keep_ffn, keep_groups = select_structures(scores, model.config, ffn_sparsity,
                                              head_sparsity, multiple)
    smaller = shrink_llama(model, keep_ffn, keep_groups)
    masks = structured_masks(model, keep_ffn, keep_groups)
    apply_masks(model, masks)
    tokens = torch.randint(0, 16, (2, 9), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(smaller(tokens).logits, model(tokens).logits,
                                   rtol=0, atol=1e-5)
    removed = sum(int((~m).sum()) for m in masks.values())
    if bias:  # a row's bias goes with the row; o_proj and down_proj lose columns only
        removed += sum(int((~m.any(dim=1)).sum()) for name, m in masks.items()
                       if not name.endswith(("o_proj", "down_proj")))
    assert shape_report(smaller)["parameters"] == shape_report(model)["parameters"] - removed
    assert shape_report(smaller)["kv_heads"] == len(keep_groups[0]) >= 1
    # Rebuilding the config runs transformers' validation, as from_pretrained does.
    type(smaller.config).from_dict(smaller.config.to_dict())


def test_smaller_model_saves_and_loads_with_stock_from_pretrained(tmp_path):
    model = tiny_llama(layers=2, hidden=12, heads=6, kv_heads=3, head_dim=4, ffn=16)
    scores = {n: m.weight.detach().abs() for n, m in
              prunable_linears(model, ("model.layers.*",)).items()}
    keep_ffn, keep_groups = select_structures(scores, model.config, 0.5, 0.34, ffn_multiple=4)
    smaller = shrink_llama(model, keep_ffn, keep_groups)
    smaller.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert shape_report(loaded) == shape_report(smaller)
    assert (shape_report(loaded)["heads"], shape_report(loaded)["kv_heads"],
            shape_report(loaded)["ffn"]) == (4, 2, 8)
    tokens = torch.randint(0, 16, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, smaller(tokens).logits)
