"""gradprune.pruning.prune: every criterion and pattern through one entry point, and back from disk."""

from __future__ import annotations

import pytest
import torch

from gradprune.config import MaskParams, ModelParams, ParamError, StructuredParams
from gradprune.models.llama import build_llama, prunable_linears
from gradprune.pruning.prune import (
    apply_pruning,
    load_pruned_model,
    prunable_sparsity,
    prune,
    save_pruned,
    with_overrides,
)
from gradprune.pruning.stats import STATISTICS, collect_gradient_stats


@pytest.fixture(scope="module")
def model_and_stats():
    model = build_llama(ModelParams(layers=2, hidden=32, heads=4, kv_heads=2, ffn=64), vocab_size=64,
                        context=16, eos_token_id=0, seed=3)
    blocks = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(4))
    linears = prunable_linears(model, ("model.layers.*",))
    stats, _ = collect_gradient_stats(model, linears, blocks, bf16=False, statistics=STATISTICS)
    shapes = {name: layer.weight.shape for name, layer in linears.items()}
    return model, stats, shapes


def fresh(model):
    copy = type(model)(model.config)
    copy.load_state_dict(model.state_dict())
    return copy


@pytest.mark.parametrize("criterion", ["gradient", "taylor", "fisher", "magnitude", "wanda",
                                       "gblm", "random", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_criterion_and_pattern_hits_its_sparsity(model_and_stats, criterion, pattern):
    model, stats, shapes = model_and_stats
    cfg = MaskParams(criterion=criterion, pattern=pattern, sparsity=0.5)
    pruned = prune(model, stats, cfg, seed=0, n_blocks=6)
    total = sum(m.numel() for m in pruned.masks.values())
    kept = sum(int(m.sum()) for m in pruned.masks.values())
    assert kept * 2 == total
    if pattern == "2:4":
        for mask in pruned.masks.values():
            assert (mask.view(mask.shape[0], -1, 4).sum(-1) == 2).all()
    pruned_model = apply_pruning(fresh(model), pruned)
    assert prunable_sparsity(pruned_model, shapes) >= 0.5  # weights can be 0 by chance
    for name, mask in pruned.masks.items():
        weight = dict(pruned_model.named_modules())[name].weight
        assert bool((weight[~mask] == 0).all())


def test_sparsegpt_rewrites_kept_weights_and_round_trips(model_and_stats, tmp_path):
    model, stats, _ = model_and_stats
    pruned = prune(model, stats, MaskParams(criterion="sparsegpt", sparsity=0.5), 0, 6)
    name = next(iter(pruned.new_weights))
    original = dict(model.named_modules())[name].weight
    mask = pruned.masks[name]
    assert not torch.equal(pruned.new_weights[name][mask], original.detach()[mask])
    (tmp_path / "dense").mkdir()
    model.save_pretrained(tmp_path / "dense")
    save_pruned(tmp_path, pruned)
    loaded, masks = load_pruned_model(tmp_path / "dense", tmp_path)
    expected = apply_pruning(fresh(model), pruned)
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert masks.keys() == pruned.masks.keys()


def test_structured_gives_a_smaller_model_with_the_masked_models_logits(model_and_stats, tmp_path):
    model, stats, shapes = model_and_stats
    cfg = MaskParams(criterion="taylor", pattern="structured", sparsity=0.5,
                     structured=StructuredParams(ffn_multiple=8))
    pruned = prune(model, stats, cfg, 0, 6)
    assert pruned.smaller.config.intermediate_size == 32
    assert pruned.smaller.config.num_key_value_heads == 1
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    masked = fresh(model)
    from gradprune.pruning.masks import apply_masks
    apply_masks(masked, pruned.masks)
    with torch.no_grad():
        assert torch.allclose(pruned.smaller(input_ids=ids).logits, masked(input_ids=ids).logits,
                              atol=1e-5)
    assert prunable_sparsity(pruned.smaller, shapes) == pytest.approx(0.5, abs=0.01)
    (tmp_path / "dense").mkdir()
    model.save_pretrained(tmp_path / "dense")
    save_pruned(tmp_path, pruned)
    loaded, masks = load_pruned_model(tmp_path / "dense", tmp_path)
    assert masks == {} and loaded.config.intermediate_size == 32


def test_overrides_and_exclude_set_per_module_targets(model_and_stats):
    model, stats, _ = model_and_stats
    cfg = MaskParams(criterion="magnitude", sparsity=0.5, overrides={"*.mlp.*": 0.75},
                     exclude=("*.self_attn.o_proj",))
    masks = prune(model, stats, cfg, 0, 6).masks
    mlp = [m for n, m in masks.items() if ".mlp." in n]
    assert sum(int(m.sum()) for m in mlp) * 4 == sum(m.numel() for m in mlp)
    assert all(bool(m.all()) for n, m in masks.items() if n.endswith("o_proj"))
    attention = [m for n, m in masks.items() if ".self_attn." in n and not n.endswith("o_proj")]
    assert sum(int(m.sum()) for m in attention) * 2 == sum(m.numel() for m in attention)


def test_bad_pattern_combinations_are_refused():
    with pytest.raises(ParamError, match="masks.sparsity: pattern 2:4 keeps 2 of every 4"):
        MaskParams(pattern="2:4", sparsity=0.7).check()
    with pytest.raises(ParamError, match="sparsegpt has no structured form"):
        MaskParams(criterion="sparsegpt", pattern="structured").check()
    with pytest.raises(ParamError, match="masks.pattern: got '3:2'"):
        MaskParams(pattern="3:2").check()
    with pytest.raises(ParamError, match="masks.variant"):
        with_overrides(MaskParams(), criterion="wanda", variant="rms")
