"""Block-wise reconstruction: it lowers a layer's output error on its calibration data, never
revives a pruned weight, and its layer-by-layer pass is the model's own forward pass."""

from __future__ import annotations

import copy

import pytest
import torch

from gradprune.config import ModelParams
from gradprune.models.llama import build_llama
from gradprune.pruning.masks import apply_masks
from gradprune.pruning.reconstruct import (
    decoder_inputs,
    layer_outputs,
    reconstruct_decoder,
    reconstruct_layer,
    relative_error,
)

VOCAB = 48


def _model(layers: int = 2, seed: int = 0):
    cfg = ModelParams(layers=layers, hidden=32, heads=4, kv_heads=2, ffn=48)
    return build_llama(cfg, vocab_size=VOCAB, context=32, eos_token_id=0, seed=seed).eval()


def _blocks(n: int = 8, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _half_masks(model, seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(m.weight.shape, generator=g) < 0.5
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")}


def test_layer_by_layer_pass_reproduces_the_models_hidden_states():
    model, blocks = _model(), _blocks()
    hidden, layer_kwargs = decoder_inputs(model, blocks, batch_size=3)
    with torch.no_grad():
        expected = model(input_ids=blocks, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden, expected[0])
    for i, layer in enumerate(model.model.layers[:-1]):
        hidden = layer_outputs(layer, hidden, layer_kwargs, batch_size=3, bf16=False)
        torch.testing.assert_close(hidden, expected[i + 1], rtol=1e-5, atol=1e-5)


def test_reconstruction_lowers_the_layer_error_and_keeps_pruned_weights_exactly_zero():
    dense, blocks = _model(), _blocks()
    pruned = copy.deepcopy(dense)
    masks = _half_masks(pruned)
    apply_masks(pruned, masks)
    inputs, layer_kwargs = decoder_inputs(dense, blocks, batch_size=4)
    dense_layer, pruned_layer = dense.model.layers[0], pruned.model.layers[0]
    layer_masks = {name[len("model.layers.0."):]: m for name, m in masks.items()
                   if name.startswith("model.layers.0.")}
    targets = layer_outputs(dense_layer, inputs, layer_kwargs, 4, False)
    before = relative_error(pruned_layer, inputs, targets, layer_kwargs, 4, False)
    record = reconstruct_layer(dense_layer, pruned_layer, layer_masks, inputs,
                               layer_kwargs=layer_kwargs, steps=40, lr=3e-3, batch_size=4,
                               bf16=False)
    assert record["error_before"] == pytest.approx(before)
    assert record["kept"] is True
    assert record["error_after"] < 0.5 * record["error_before"]
    assert relative_error(pruned_layer, inputs, targets, layer_kwargs, 4, False) == \
        pytest.approx(record["error_after"])
    modules = dict(pruned_layer.named_modules())
    for name, mask in layer_masks.items():
        weight = modules[name].weight
        assert torch.equal(weight[~mask], torch.zeros(int((~mask).sum())))
        # The kept weights did move.
        assert not torch.equal(weight[mask], dict(dense_layer.named_modules())[name].weight[mask])
    # The other layer and the norms are untouched.
    for (name, p), q in zip(pruned.model.layers[1].named_parameters(),
                            dense.model.layers[1].parameters()):
        assert torch.equal(p, q * masks.get(f"model.layers.1.{name[:-len('.weight')]}",
                                            torch.ones_like(q, dtype=torch.bool)))
    assert torch.equal(pruned_layer.input_layernorm.weight, dense_layer.input_layernorm.weight)


def test_a_tuning_that_would_raise_the_error_is_undone():
    dense, blocks = _model(), _blocks()
    pruned = copy.deepcopy(dense)
    masks = _half_masks(pruned)
    apply_masks(pruned, masks)
    inputs, layer_kwargs = decoder_inputs(dense, blocks, batch_size=4)
    layer = pruned.model.layers[0]
    weights = {n: p.clone() for n, p in layer.named_parameters()}
    record = reconstruct_layer(dense.model.layers[0], layer, {}, inputs, layer_kwargs=layer_kwargs,
                               steps=3, lr=10.0, batch_size=4, bf16=False)
    assert record["kept"] is False
    assert record["error_after"] == record["error_before"]
    assert all(torch.equal(p, weights[n]) for n, p in layer.named_parameters())


def test_reconstruct_decoder_lowers_every_layers_error_and_the_output_error():
    dense, blocks = _model(layers=3), _blocks()
    pruned = copy.deepcopy(dense)
    masks = _half_masks(pruned)
    apply_masks(pruned, masks)
    with torch.no_grad():
        target = dense(input_ids=blocks).logits
        error_before = (pruned(input_ids=blocks).logits - target).square().mean()
    records = reconstruct_decoder(dense, pruned, masks, blocks, steps=30, lr=3e-3, batch_size=4,
                                  bf16=False)
    assert [r["layer"] for r in records] == [0, 1, 2]
    assert all(r["error_after"] < r["error_before"] for r in records)
    with torch.no_grad():
        error_after = (pruned(input_ids=blocks).logits - target).square().mean()
    assert error_after < error_before
    modules = dict(pruned.named_modules())
    assert all(torch.equal(modules[n].weight[~m], torch.zeros(int((~m).sum())))
               for n, m in masks.items())


def test_a_mask_for_an_unknown_linear_names_it():
    dense = _model()
    inputs, layer_kwargs = decoder_inputs(dense, _blocks(2), batch_size=2)
    with pytest.raises(ValueError, match="mask for mlp.gate, which is no Linear"):
        reconstruct_layer(dense.model.layers[0], copy.deepcopy(dense.model.layers[0]),
                          {"mlp.gate": torch.ones(1, dtype=torch.bool)}, inputs,
                          layer_kwargs=layer_kwargs, steps=1, lr=1e-3, batch_size=2, bf16=False)


def test_a_structurally_smaller_model_is_reconstructed_whole():
    from gradprune.config import MaskParams
    from gradprune.pruning.prune import prune

    dense, blocks = _model(), _blocks()
    stats = {name: {} for name, m in dense.named_modules()
             if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")}
    smaller = prune(dense, stats, MaskParams(criterion="magnitude", sparsity=0.5,
                                             pattern="structured"), seed=0, n_blocks=1).smaller
    assert smaller.config.intermediate_size < dense.config.intermediate_size
    records = reconstruct_decoder(dense, smaller, {}, blocks, steps=30, lr=3e-3, batch_size=4,
                                  bf16=False)
    assert all(r["error_after"] < r["error_before"] for r in records)


def test_reconstruct_pruned_stores_the_tuned_weights_and_leaves_dense_alone():
    from gradprune.config import MaskParams
    from gradprune.config.schema import ReconstructParams
    from gradprune.pruning.prune import apply_pruning, prune, reconstruct_pruned

    dense, blocks = _model(), _blocks()
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}
    stats = {name: {} for name, m in dense.named_modules()
             if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")}
    cfg = MaskParams(criterion="magnitude", sparsity=0.5, scope="per_layer",
                     reconstruct=ReconstructParams(steps=20, lr=3e-3, batch_size=4, bf16="off"))
    pruned = prune(dense, stats, cfg, seed=0, n_blocks=1)
    report = reconstruct_pruned(dense, pruned, blocks, cfg, seed=0)
    assert all(torch.equal(v, dense_state[k]) for k, v in dense.state_dict().items())
    assert set(pruned.new_weights) == set(pruned.masks)
    assert report["mean_error_after"] < report["mean_error_before"]
    assert len(report["layers"]) == 2 and report["calibration_blocks"] == len(blocks)
    model = apply_pruning(copy.deepcopy(dense), pruned)
    modules = dict(model.named_modules())
    for name, mask in pruned.masks.items():
        assert torch.equal(modules[name].weight, pruned.new_weights[name])
        assert int(torch.count_nonzero(modules[name].weight[~mask])) == 0


@pytest.mark.parametrize("masks, key, message", [
    ({"reconstruct": {"steps": -1}}, "masks.reconstruct.steps", "must be at least 0"),
    ({"reconstruct": {"lr": 0}}, "masks.reconstruct.lr", "must be positive"),
    ({"reconstruct": {"batch_size": 0}}, "masks.reconstruct.batch_size", "must be at least 1"),
])
def test_bad_reconstruct_params_name_the_key(masks, key, message):
    from gradprune.config import ParamError, params_from_dict

    with pytest.raises(ParamError) as info:
        params_from_dict({"masks": masks})
    assert info.value.key == key and message in str(info.value)


def test_report_shows_the_reconstructed_scoring_and_structured_speedups():
    from tasks.report import report_table

    row = {"perplexity_test": 10.0, "tasks": {}, "sparsity": 0.0, "parameters": 10, "nonzero": 10,
           "bytes": {"dense_export": 1e6, "sparse_export": 1e6}}
    base = {"sparsity": 0.5, "parameters": 5, "nonzero": 5}
    compared = [{"criterion": "wanda", "pattern": "structured", "test_perplexity": 30.0, **base,
                 "speed": {"settings": {"batch_sizes": [8, 1]},
                           "batch_1": {"prefill_speedup": 1.456, "decode_speedup": 1.2},
                           "batch_8": {"prefill_speedup": 2.0, "decode_speedup": 2.0}},
                 "reconstructed": {"test_perplexity": 20.0, **base}}]
    header, body = report_table((), {"dense": row}, compared, {})
    assert header[-1] == "prefill/decode speedup"
    assert [r[0] for r in body] == ["dense", "wanda structured (no fine-tuning)",
                                    "wanda structured (block reconstruction)"]
    assert [r[1] for r in body] == ["10.00", "30.00", "20.00"]
    # Recovery keeps the shapes, so the row's speedup holds for every scoring of it.
    assert [r[-1] for r in body] == ["-", "1.46x/1.20x", "1.46x/1.20x"]
