"""OWL's layer-wise sparsity: known answers on a hand-made example, the mean kept exact, and
its params."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradprune.config import MaskParams, ParamError, params_from_dict
from gradprune.pruning.allocation import (
    decoder_layer,
    layer_sparsities,
    outlier_ratios,
    owl_targets,
    whole_weight_targets,
)
from gradprune.pruning.masks import masks_for_targets
from gradprune.pruning.prune import prune, pruning_report


def _hand_made():
    """Three layers of one 4 x 5 Linear each, act_norm 1 unless said otherwise.

    layer 0: every |w| = 1: mean score 1, no score above 2 * mean: outlier ratio 0.
    layer 1: one weight 100: mean (19 + 100) / 20 = 5.95, one score above 11.9: 1/20.
    layer 2: weights 1, input channel 0's norm 100: mean (16 + 400) / 20 = 20.8, the four
             scores of column 0 above 41.6: 4/20.
    """
    weights = {f"model.layers.{i}.mlp.up_proj": torch.ones(4, 5) for i in range(3)}
    weights["model.layers.1.mlp.up_proj"][2, 3] = -100.0
    stats = {name: {"act_norm": torch.ones(5)} for name in weights}
    stats["model.layers.2.mlp.up_proj"]["act_norm"][0] = 100.0
    return weights, stats


def test_outlier_ratios_of_the_hand_made_layers():
    weights, stats = _hand_made()
    assert outlier_ratios(weights, stats, threshold=2.0) == {
        "model.layers.0": 0.0, "model.layers.1": 0.05, "model.layers.2": 0.2}


def test_layer_sparsity_follows_the_outlier_ratio_and_keeps_the_mean():
    # r = (0, 0.25, 1), mean 5/12; s_l = 0.5 - 2 * 0.09 * (r_l - 5/12).
    sizes = dict.fromkeys(("a", "b", "c"), 20)
    got = layer_sparsities({"a": 0.0, "b": 0.05, "c": 0.2}, sizes, 0.5, 0.09)
    assert got == pytest.approx({"a": 0.575, "b": 0.53, "c": 0.395}, abs=1e-12)
    assert sum(got.values()) / 3 == pytest.approx(0.5, abs=1e-12)
    # More outliers, less pruned.
    assert got["a"] > got["b"] > got["c"]
    # Equal ratios: uniform.
    assert layer_sparsities({"a": 0.1, "b": 0.1}, {"a": 5, "b": 7}, 0.4, 0.2) == {"a": 0.4,
                                                                               "b": 0.4}


def test_layer_sparsity_mean_is_weighted_by_the_layers_size():
    # r = (0, 1), sizes 1 and 3: weighted mean r = 0.75; s = 0.5 - 0.2 (r - 0.75).
    got = layer_sparsities({"small": 0.0, "big": 0.3}, {"small": 10, "big": 30}, 0.5, 0.1)
    assert got == pytest.approx({"small": 0.65, "big": 0.45}, abs=1e-12)
    assert (got["small"] * 10 + got["big"] * 30) / 40 == pytest.approx(0.5, abs=1e-12)


def test_owl_targets_share_whole_weights_by_largest_remainder():
    weights, stats = _hand_made()
    targets = dict.fromkeys(weights, 0.5)
    got, report = owl_targets(weights, stats, targets, 0.5, outlier_threshold=2.0,
                              max_deviation=0.09)
    # Ideal counts 11.5, 10.6, 7.9 (sum 30): floors 11, 10, 7 and the two extra weights go to
    # the remainders 0.9 and 0.6.
    assert got == {"model.layers.0.mlp.up_proj": 11 / 20, "model.layers.1.mlp.up_proj": 11 / 20,
                   "model.layers.2.mlp.up_proj": 8 / 20}
    assert list(report) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert report["model.layers.2"] == {"outlier_ratio": 0.2,
                                        "sparsity": pytest.approx(0.395, abs=1e-12)}
    masks = masks_for_targets({n: w.abs() for n, w in weights.items()}, got, "per_layer")
    assert sum(int((~m).sum()) for m in masks.values()) == 30


def test_excluded_tensors_stay_dense_and_outside_the_allocation():
    weights, stats = _hand_made()
    targets = {**dict.fromkeys(weights, 0.5), "model.layers.0.mlp.up_proj": 0.0}
    got, report = owl_targets(weights, stats, targets, 0.5, 2.0, 0.09)
    assert got["model.layers.0.mlp.up_proj"] == 0.0
    assert "model.layers.0" not in report
    assert round(got["model.layers.1.mlp.up_proj"] * 20) + \
        round(got["model.layers.2.mlp.up_proj"] * 20) == 20


def test_decoder_layer_groups_linears_by_their_numbered_layer():
    assert decoder_layer("model.layers.12.self_attn.q_proj") == "model.layers.12"
    assert decoder_layer("decoder.layers.0.multihead_attn.k_proj") == "decoder.layers.0"
    assert decoder_layer("lm_head") == "lm_head"


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 200), min_size=1, max_size=12),
       ratios=st.lists(st.floats(0, 1), min_size=12, max_size=12),
       sparsity=st.floats(0.2, 0.8), deviation=st.floats(0.001, 0.1))
def test_mean_sparsity_is_exact_in_whole_weights(sizes, ratios, sparsity, deviation):
    names = [f"t{i}" for i in range(len(sizes))]
    per_layer = layer_sparsities(dict(zip(names, ratios)), dict(zip(names, sizes)), sparsity,
                                 deviation)
    targets = whole_weight_targets(per_layer, dict(zip(names, sizes)), round(sparsity * sum(sizes)))
    counts = [round(targets[n] * s) for n, s in zip(names, sizes)]
    assert sum(counts) == round(sparsity * sum(sizes))
    for name, size, count in zip(names, sizes, counts):
        assert abs(count - per_layer[name] * size) < 1 + 1e-9
        assert targets[name] * size == pytest.approx(count, abs=1e-9)


def _llama_and_stats(seed: int = 0):
    from gradprune.config import ModelParams
    from gradprune.models.llama import build_llama

    model = build_llama(ModelParams(layers=3, hidden=16, heads=2, kv_heads=1, ffn=24),
                        vocab_size=32, context=16, eos_token_id=0, seed=seed)
    g = torch.Generator().manual_seed(seed)
    stats = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            act = 0.5 + torch.rand(module.in_features, generator=g)
            # Layer i has i + 1 outlier input channels.
            act[: 1 + int(name.split(".")[2])] *= 20
            stats[name] = {"act_norm": act,
                           "hessian": torch.eye(module.in_features) * act.square()}
    return model, stats


@pytest.mark.parametrize("criterion, scope", [("wanda", "per_layer"), ("sparsegpt", "global")])
def test_prune_with_owl_prunes_exactly_the_target_and_reports_the_layers(criterion, scope):
    model, stats = _llama_and_stats()
    cfg = MaskParams(criterion=criterion, sparsity=0.5, scope=scope, allocation="owl")
    cfg.check()
    pruned = prune(model, stats, cfg, seed=0, n_blocks=1)
    report = pruning_report(pruned, model)
    total = report["total"]
    assert total["numel"] - total["kept"] == round(0.5 * total["numel"])
    layers = report["allocation"]
    assert list(layers) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    sparsities = [layers[f"model.layers.{i}"]["sparsity"] for i in range(3)]
    assert len(set(sparsities)) == 3
    # Fewer outliers, more pruned.
    order = sorted(layers, key=lambda name: layers[name]["outlier_ratio"])
    assert [layers[n]["sparsity"] for n in order] == sorted(sparsities, reverse=True)


def test_uniform_allocation_is_the_default_and_unchanged():
    model, stats = _llama_and_stats()
    cfg = MaskParams(criterion="wanda", sparsity=0.5, scope="per_row")
    pruned = prune(model, stats, cfg, seed=0, n_blocks=1)
    assert pruned.allocation == {}
    assert "allocation" not in pruning_report(pruned, model)


@pytest.mark.parametrize("masks, key, message", [
    ({"allocation": "owl", "criterion": "wanda", "scope": "global"}, "masks.allocation",
     "set masks.scope to per_layer or per_row"),
    ({"allocation": "owl", "criterion": "wanda", "scope": "per_row", "pattern": "2:4"},
     "masks.allocation", "pattern '2:4' needs 'uniform'"),
    ({"allocation": "owl", "criterion": "wanda", "scope": "per_row",
      "overrides": {"*.mlp.*": 0.6}}, "masks.allocation", "use one of them"),
    ({"allocation": "owl", "criterion": "sparsegpt", "sparsity": 0.9}, "masks.owl.max_deviation",
     "outside [0, 1) for sparsity 0.9"),
    ({"allocation": "owl", "criterion": "wanda", "scope": "per_row", "tau": 0.1,
      "sparsity": None}, "masks.allocation", "set it, not tau"),
    ({"allocation": "bimodal"}, "masks.allocation", "allowed: 'uniform', 'owl'"),
    ({"owl": {"outlier_threshold": 0}}, "masks.owl.outlier_threshold", "must be positive"),
])
def test_bad_owl_params_name_the_key(masks, key, message):
    with pytest.raises(ParamError) as info:
        params_from_dict({"masks": masks})
    assert info.value.key == key
    assert message in str(info.value)


def test_compare_rows_take_owl_only_where_it_applies():
    from tasks.compare import row_mask_params

    params = params_from_dict({"masks": {"allocation": "owl", "criterion": "sparsegpt"},
                               "compare": {"scopes": {"wanda": "per_row"}}})
    assert row_mask_params(params, "wanda", "unstructured").allocation == "owl"
    assert row_mask_params(params, "sparsegpt", "unstructured").allocation == "owl"
    assert row_mask_params(params, "gradient", "unstructured").allocation == "uniform"
    assert row_mask_params(params, "wanda", "2:4").allocation == "uniform"
