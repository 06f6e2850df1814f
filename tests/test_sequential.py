"""Layer-by-layer calibration: with nothing pruned it reproduces the one-pass statistics of
every layer; pruning, the first layer equals one-pass and each later layer is pruned from the
activations of the pruned layers before it."""

from __future__ import annotations

import copy

import pytest
import torch

from gradprune.config import MaskParams, ModelParams, ParamError, SparseGPTParams, params_from_dict
from gradprune.models.llama import build_llama, prunable_linears
from gradprune.pruning.masks import apply_masks
from gradprune.pruning.prune import prune
from gradprune.pruning.sequential import (
    calibrate_layers,
    prune_calibrated,
    prune_layer_by_layer,
    statistics_to_load,
)
from gradprune.pruning.stats import collect_gradient_stats, requested_statistics

TINY = ModelParams(layers=3, hidden=32, heads=4, kv_heads=2, ffn=64)
VOCAB, CONTEXT = 64, 16
WANDA = MaskParams(criterion="wanda", sparsity=0.5, scope="per_row", calibration="sequential")


def _model(seed: int = 0):
    return build_llama(TINY, vocab_size=VOCAB, context=CONTEXT, eos_token_id=0, seed=seed)


def _blocks(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, CONTEXT), generator=torch.Generator().manual_seed(seed))


def _one_pass(model, blocks):
    linears = prunable_linears(model, ("model.layers.*",))
    return collect_gradient_stats(model, linears, blocks, bf16=False,
                                  statistics=["act_norm", "hessian"])[0]


def _layer(name: str) -> int:
    return int(name.split(".")[2])


def test_with_nothing_pruned_every_layer_has_the_one_pass_statistics():
    model, blocks = _model(1), _blocks(3, 2)
    want = _one_pass(model, blocks)
    got = {}
    calibrate_layers(model, blocks, prunable_linears(model, ("model.layers.*",)), got.update)
    assert got.keys() == want.keys() and len(got) == 3 * 7
    for name in want:
        for stat in ("act_norm", "hessian"):
            torch.testing.assert_close(got[name][stat], want[name][stat], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name}.{stat}: {m}")


def test_wanda_first_layer_equals_one_pass_and_later_layers_see_the_pruned_ones():
    dense, blocks = _model(3), _blocks(4, 5)
    one_pass = _one_pass(dense, blocks)
    one_pass_masks = prune(dense, one_pass, MaskParams(criterion="wanda", sparsity=0.5,
                                                       scope="per_row"), 0, 4).masks
    model = copy.deepcopy(dense)
    pruned = prune_layer_by_layer(model, blocks, {n: {} for n in one_pass}, WANDA, 0, 4)

    assert pruned.masks.keys() == one_pass.keys()
    for name in one_pass:
        if _layer(name) == 0:
            assert torch.equal(pruned.masks[name], one_pass_masks[name]), name
    assert any(not torch.equal(pruned.masks[n], one_pass_masks[n]) for n in one_pass
               if _layer(n) > 0)

    # The reference for layer 1: prune layer 0 as one-pass did, then layer 1's one-pass
    # statistics on that model are what the sequential pass pruned layer 1 from.
    reference = copy.deepcopy(dense)
    apply_masks(reference, {n: m for n, m in one_pass_masks.items() if _layer(n) == 0})
    after_layer_0 = _one_pass(reference, blocks)
    layer_1 = {n: after_layer_0[n] for n in after_layer_0 if _layer(n) == 1}
    want = prune(reference, layer_1, WANDA, 0, 4).masks
    for name, mask in want.items():
        assert torch.equal(pruned.masks[name], mask), name
        # per_row at 0.5: exactly half of every row pruned
        assert (mask.sum(dim=1) == mask.shape[1] // 2).all()

    # The model ends pruned with those masks; the one-pass prune leaves its model unchanged.
    modules = dict(model.named_modules())
    for name, mask in pruned.masks.items():
        assert torch.equal(modules[name].weight != 0, mask), name
    untouched = copy.deepcopy(dense)
    prune_calibrated(untouched, one_pass, MaskParams(criterion="wanda", sparsity=0.5,
                                                     scope="per_row", calibration="one_pass"),
                     0, 4, None, arch="llama")
    assert all(torch.equal(a, b) for a, b in zip(untouched.parameters(), dense.parameters()))


def test_sparsegpt_first_layer_equals_one_pass():
    dense, blocks = _model(4), _blocks(4, 6)
    one_pass = _one_pass(dense, blocks)
    cfg = MaskParams(criterion="sparsegpt", sparsity=0.5, calibration="sequential",
                     sparsegpt=SparseGPTParams(block_size=16, damp=0.01))
    want = prune(dense, one_pass, cfg, 0, 4)
    got = prune_layer_by_layer(copy.deepcopy(dense), blocks, {n: {} for n in one_pass}, cfg, 0, 4)
    for name in one_pass:
        if _layer(name) == 0:
            assert torch.equal(got.masks[name], want.masks[name]), name
            torch.testing.assert_close(got.new_weights[name], want.new_weights[name],
                                       rtol=1e-5, atol=1e-6)
    assert len(got.new_weights) == len(one_pass)


def test_params_refuse_what_layer_by_layer_cannot_do():
    with pytest.raises(ParamError) as err:
        params_from_dict({"masks": {"criterion": "wanda", "calibration": "sequential"}})
    assert err.value.key == "masks.scope"
    with pytest.raises(ParamError) as err:
        params_from_dict({"masks": {"criterion": "wanda", "calibration": "sequential",
                                    "pattern": "structured"}})
    assert err.value.key == "masks.calibration"
    params_from_dict({"masks": {"criterion": "sparsegpt", "calibration": "sequential"}})


def test_the_gradient_pass_leaves_the_activations_to_the_masks_stage():
    params = params_from_dict({"masks": {"criterion": "sparsegpt", "calibration": "sequential"},
                               "compare": {"criteria": ["sparsegpt", "gblm", "gradient"]}})
    assert requested_statistics(params) == ("grad_mean", "grad_sq_mean")
    gblm = MaskParams(criterion="gblm", calibration="sequential", scope="per_row")
    assert statistics_to_load(gblm, "llama") == {"grad_sq_mean"}
    assert statistics_to_load(MaskParams(criterion="gblm"), "llama") == {"grad_sq_mean",
                                                                        "act_norm"}


@pytest.mark.parametrize("changes, arch, expected", [
    ({"criterion": "sparsegpt"}, "llama", True),
    ({"criterion": "sparsegpt", "pattern": "2:4", "sparsity": 0.5}, "llama", True),
    # Where the dense activations are needed, or the decoder is not a LLaMA: one-pass.
    ({"criterion": "sparsegpt", "allocation": "owl"}, "llama", False),
    ({"criterion": "sparsegpt", "reconstruct": {"steps": 4}}, "llama", False),
    ({"criterion": "sparsegpt"}, "seq2seq", False),
    # Wanda and GBLM measured no better layer by layer: auto keeps them one-pass.
    ({"criterion": "wanda", "scope": "per_row"}, "llama", False),
    ({"criterion": "gblm", "scope": "per_row"}, "llama", False),
    ({"criterion": "gradient"}, "llama", False),
    ({"criterion": "sparsegpt", "calibration": "one_pass"}, "llama", False),
    ({"criterion": "wanda", "scope": "per_row", "calibration": "sequential"}, "llama", True),
])
def test_auto_calibrates_sparsegpt_layer_by_layer_where_it_can(changes, arch, expected):
    masks = params_from_dict({"masks": changes}).masks
    assert masks.layer_by_layer(arch) is expected
    reads = statistics_to_load(masks, arch)
    if masks.criterion == "sparsegpt":
        assert reads == (set() if expected else {"hessian"})

