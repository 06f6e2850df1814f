"""The training loop (masked and dense), its schedule, and the gradient statistics pass."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gradprune.config import ModelParams, TrainParams
from gradprune.models.llama import build_llama, prunable_linears
from gradprune.pruning.stats import STATISTICS, collect_gradient_stats
from gradprune.training.loop import batch_order, lr_at, mean_loss, train_lm

VOCAB, CONTEXT = 64, 16
TINY = ModelParams(layers=1, hidden=16, heads=2, kv_heads=1, ffn=32)


def _model(seed: int = 0):
    return build_llama(TINY, vocab_size=VOCAB, context=CONTEXT, eos_token_id=0, seed=seed)


def _blocks(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, CONTEXT), generator=g)


def _random_masks(model, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(layer.weight.shape, generator=g) < 0.5
            for name, layer in prunable_linears(model, ("model.layers.*",)).items()}


CFG = TrainParams(steps=6, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=2,
                  weight_decay=0.1, grad_clip=1.0, eval_every=3, eval_blocks=4, bf16="off")


# --- learning-rate schedule and batch order ------------------------------------------------

def test_lr_at_warmup_then_cosine():
    cfg = TrainParams(steps=10, lr=1.0, min_lr=0.1, warmup_steps=2)
    # warmup: lr * (step + 1) / warmup_steps
    assert lr_at(0, cfg) == pytest.approx(0.5)
    assert lr_at(1, cfg) == pytest.approx(1.0)
    # cosine over span = steps - warmup = 8: min + 0.5 (lr - min) (1 + cos(pi (step - 2) / 8))
    assert lr_at(2, cfg) == pytest.approx(1.0)
    assert lr_at(4, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))  # 0.868198
    assert lr_at(4, cfg) == pytest.approx(0.8681980515)
    assert lr_at(6, cfg) == pytest.approx(0.55)
    assert lr_at(9, cfg) == pytest.approx(0.1342542138)  # cos(7 pi / 8) = -0.92388
    assert lr_at(10, cfg) == pytest.approx(0.1)
    assert lr_at(50, cfg) == pytest.approx(0.1)  # progress is clamped at 1


def test_lr_at_without_warmup():
    cfg = TrainParams(steps=4, lr=2.0, min_lr=0.0, warmup_steps=0)
    assert [lr_at(s, cfg) for s in range(4)] == pytest.approx([2.0, 1.7071067812, 1.0,
                                                              0.2928932188])


def test_batch_order_deterministic_and_covers_each_epoch():
    order = batch_order(n_blocks=6, batch_size=4, steps=6, seed=3)
    assert order.shape == (6, 4)
    assert torch.equal(order, batch_order(6, 4, 6, seed=3))
    assert not torch.equal(order, batch_order(6, 4, 6, seed=4))
    flat = order.reshape(-1)
    for epoch in range(4):  # 24 draws = exactly four epochs of six blocks
        assert sorted(flat[epoch * 6:(epoch + 1) * 6].tolist()) == list(range(6))


def test_batch_order_partial_last_epoch():
    flat = batch_order(n_blocks=5, batch_size=3, steps=4, seed=0).reshape(-1)  # 12 draws
    assert sorted(flat[:5].tolist()) == list(range(5))
    assert sorted(flat[5:10].tolist()) == list(range(5))
    assert len(set(flat[10:].tolist())) == 2  # start of a third permutation: no repeats


# --- masked and dense training -------------------------------------------------------------

@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_masked_training_keeps_pruned_weights_exactly_zero(bf16, weight_decay):
    model = _model()
    masks = _random_masks(model, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = dataclasses.replace(CFG, weight_decay=weight_decay)
    seen = []
    curve = train_lm(model, _blocks(12, 0), _blocks(4, 1), cfg, seed=0, bf16=bf16, masks=masks,
                     validate_also_at={1}, on_validation=lambda s, v: seen.append(s))
    assert [p.step for p in curve] == [1, 2, 3, 4, 5, 6]
    assert seen == [1, 3, 6]
    assert [p.val_loss is not None for p in curve] == [True, False, True, False, False, True]
    assert all(math.isfinite(p.train_loss) for p in curve)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        weight = params[f"{name}.weight"].detach()
        assert (weight[~mask] == 0).all(), name
        # kept weights moved (Adam moves every entry with a non-zero gradient)
        changed = weight[mask] != before[f"{name}.weight"][mask]
        assert changed.float().mean() > 0.95, name
    # parameters outside the masks trained too
    assert not torch.equal(params["model.embed_tokens.weight"],
                           before["model.embed_tokens.weight"])


def test_dense_training_is_bit_reproducible():
    states = []
    for _ in range(2):
        model = _model(seed=5)
        train_lm(model, _blocks(12, 0), _blocks(4, 1), CFG, seed=9, bf16=False,
                 masks=_random_masks(model, seed=2))
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_training_lowers_loss_on_repeated_data():
    model = _model()
    blocks = _blocks(4, 0)
    start = mean_loss(model, blocks, batch_size=2, bf16=False)
    cfg = TrainParams(steps=20, batch_size=4, lr=3e-2, min_lr=3e-3, warmup_steps=2,
                      weight_decay=0.0, eval_every=20, eval_blocks=4, bf16="off")
    curve = train_lm(model, blocks, blocks, cfg, seed=0, bf16=False)
    assert curve[-1].val_loss == pytest.approx(mean_loss(model, blocks, 4, False))
    assert curve[-1].val_loss < start - 0.5


def test_mean_loss_matches_hf_loss():
    model = _model()
    blocks = _blocks(5, 3)
    with torch.no_grad():
        hf = model(input_ids=blocks, labels=blocks).loss.item()
    # equal-length blocks: the mean over tokens is the same in any batching
    assert mean_loss(model, blocks, batch_size=2, bf16=False) == pytest.approx(hf, rel=1e-5)


# --- gradient statistics ---------------------------------------------------------------------

def test_collect_gradient_stats_known_values():
    model = _model(seed=11)
    blocks = _blocks(3, 4)
    linears = prunable_linears(model, ("model.layers.*",))
    # A frozen parameter must stay frozen afterwards.
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    stats, loss = collect_gradient_stats(model, linears, blocks, bf16=False)

    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert list(stats) == list(linears)
    assert all(p.grad is None for p in model.parameters())

    # The reference: one backward of the mean loss over all blocks, and a manual input hook.
    reference = _model(seed=11)
    ref_linears = prunable_linears(reference, ("model.layers.*",))
    sq = {name: torch.zeros(layer.in_features) for name, layer in ref_linears.items()}

    def record(name):
        def hook(module, inputs):  # returns None: the input passes through unchanged
            x = inputs[0].detach().reshape(-1, module.in_features)
            sq[name] += x.square().sum(0)
        return hook

    hooks = [layer.register_forward_pre_hook(record(name)) for name, layer in ref_linears.items()]
    reference.eval()
    ref_loss = reference(input_ids=blocks, labels=blocks).loss
    ref_loss.backward()
    for h in hooks:
        h.remove()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)

    for name, layer in ref_linears.items():
        s = stats[name]
        assert set(s) == {"grad_mean", "grad_abs_mean", "grad_sq_mean", "act_norm"}
        assert s["grad_mean"].dtype == torch.float32
        assert s["grad_mean"].shape == layer.weight.shape
        assert torch.allclose(s["grad_mean"], layer.weight.grad, rtol=1e-5, atol=1e-5), name
        assert s["grad_mean"].abs().max() > 0
        assert (s["grad_abs_mean"] >= s["grad_mean"].abs() * (1 - 1e-6)).all(), name
        # E[g^2] >= E[g]^2 (up to float rounding in the last place)
        assert (s["grad_sq_mean"] >= s["grad_mean"].square() * (1 - 1e-5)).all(), name
        assert s["act_norm"].shape == (layer.in_features,)
        assert torch.allclose(s["act_norm"], sq[name].sqrt(), rtol=1e-5, atol=1e-6), name


def test_collect_gradient_stats_single_block_moments_agree():
    # With one block, E|g| = |E[g]| and E[g^2] = E[g]^2 exactly.
    model = _model(seed=2)
    linears = prunable_linears(model, ("model.layers.0.mlp.*",))
    stats, _ = collect_gradient_stats(model, linears, _blocks(1, 0), bf16=False)
    assert list(stats) == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj",
                           "model.layers.0.mlp.up_proj"]
    for s in stats.values():
        assert torch.equal(s["grad_abs_mean"], s["grad_mean"].abs())
        assert torch.equal(s["grad_sq_mean"], s["grad_mean"].square())
    assert all(p.requires_grad for p in model.parameters())


def test_collect_gradient_stats_rejects_no_blocks():
    model = _model()
    with pytest.raises(ValueError, match="no calibration blocks"):
        collect_gradient_stats(model, prunable_linears(model, ("model.layers.*",)),
                               torch.zeros(0, CONTEXT, dtype=torch.long), bf16=False)


def test_collect_gradient_stats_hessian_is_xtx_over_tokens():
    model = _model(seed=5)
    blocks = _blocks(3, 1)
    linears = prunable_linears(model, ("model.layers.0.*",))
    stats, _ = collect_gradient_stats(model, linears, blocks, bf16=False, statistics=STATISTICS)

    inputs = {name: [] for name in linears}

    def record(name):
        def hook(module, args):
            inputs[name].append(args[0].detach().reshape(-1, module.in_features))
        return hook

    hooks = [layer.register_forward_pre_hook(record(name)) for name, layer in linears.items()]
    with torch.no_grad():
        for block in blocks:
            model(input_ids=block.unsqueeze(0))
    for h in hooks:
        h.remove()
    for name, layer in linears.items():
        x = torch.cat(inputs[name]).double()
        assert len(x) == blocks.numel()  # every token, once per forward
        want = (x.T @ x / len(x)).float()
        got = stats[name]["hessian"]
        assert got.dtype == torch.float32
        assert got.shape == (layer.in_features, layer.in_features)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), name
        # act_norm is the square root of the hessian's diagonal times the token count
        assert torch.allclose(stats[name]["act_norm"], (got.diagonal() * len(x)).sqrt(),
                              rtol=1e-5)
    without, _ = collect_gradient_stats(model, linears, blocks, bf16=False)
    assert all("hessian" not in s for s in without.values())
