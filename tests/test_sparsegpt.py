"""SparseGPT: OBS updates on hand-sized layers, exact counts, N:M structure, and a lower
reconstruction error than magnitude pruning on correlated inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradprune.pruning.masks import masks_for_sparsity
from gradprune.pruning.sparsegpt import sparsegpt_prune, sparsegpt_prune_layers

T, F = True, False


def test_two_columns_obs_update_known_answer():
    # H = [[1, .5], [.5, 1]] plus 1% of its mean diagonal. OBS saliency w^2 / U_jj^2 with
    # U_00^2 = [H^-1]_00 = 1.01 / (1.01^2 - .25) ~ 1.31 and U_11^2 = 1 / 1.01:
    # row 0: 0.76, 4.04; row 1: 6.86, 0.25. Pruning 2 of 4 takes row 0's first weight and
    # row 1's second, so the rows differ (the mask is chosen over the block, not per row).
    # Zeroing w_00 moves its contribution onto w_01: + 1 * H_01 / H_11 = .5 / 1.01. Row 1's
    # pruned weight is the last column: nothing is left to compensate it.
    weight = torch.tensor([[1.0, 2.0], [3.0, 0.5]])
    hessian = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    new, keep = sparsegpt_prune(weight, hessian, 0.5)
    assert weight.tolist() == [[1.0, 2.0], [3.0, 0.5]]  # the input is left alone
    assert new.is_contiguous()
    assert keep.tolist() == [[F, T], [T, F]]
    assert new[0, 0] == 0 and new[1, 1] == 0
    assert new[0, 1].item() == pytest.approx(2 + 0.5 / 1.01, rel=1e-6)
    assert new[1, 0].item() == pytest.approx(3.0, rel=1e-6)


def test_uncorrelated_inputs_reduce_to_magnitude_pruning():
    # With H diagonal and equal, OBS has nothing to compensate with and the saliency is w^2:
    # the mask is magnitude's and the kept weights are untouched.
    weight = torch.tensor([[1.0, -6.0, 0.5, 4.0, 2.0, -3.0],
                           [-7.0, 0.25, 5.0, -1.0, 0.75, 8.0]])
    new, keep = sparsegpt_prune(weight, 3 * torch.eye(6), 0.5)
    assert keep.tolist() == [[F, T, F, T, F, T], [T, F, T, F, F, T]]
    assert torch.equal(new, weight * keep)
    assert torch.equal(keep, masks_for_sparsity({"w": weight.abs()}, 0.5, "per_layer")["w"])


def _correlated_layer(seed: int, rows: int = 24, columns: int = 64, tokens: int = 256):
    """A weight and inputs whose channels share a few latent factors, so OBS can compensate."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, 8, generator=g)
    x = latent @ torch.randn(8, columns, generator=g) + 0.3 * torch.randn(tokens, columns,
                                                                         generator=g)
    weight = torch.randn(rows, columns, generator=g)
    return weight, x


def _error(weight: torch.Tensor, new: torch.Tensor, x: torch.Tensor) -> float:
    return float(((weight - new) @ x.T).square().sum())


@settings(max_examples=5, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.3, 0.5, 0.7]))
def test_reconstruction_error_beats_magnitude(seed, sparsity):
    weight, x = _correlated_layer(seed)
    new, keep = sparsegpt_prune(weight, x.T @ x / len(x), sparsity, block_size=16)
    magnitude = masks_for_sparsity({"w": weight.abs()}, sparsity, "per_layer")["w"]
    assert _error(weight, new, x) < _error(weight, weight * magnitude, x)
    assert int((~keep).sum()) == int((~magnitude).sum())


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0, 0.95), st.sampled_from([1, 7, 16, 128]))
def test_exact_zero_count_for_any_block_size(seed, sparsity, block_size):
    weight, x = _correlated_layer(seed, rows=9, columns=40, tokens=64)
    new, keep = sparsegpt_prune(weight, x.T @ x, sparsity, block_size=block_size)
    n_prune = round(sparsity * weight.numel())
    assert int((~keep).sum()) == n_prune
    assert int((new == 0).sum()) == n_prune  # pruned exactly 0, kept (almost surely) not
    assert (new[~keep] == 0).all()
    assert new.dtype == weight.dtype


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_n_m_structure(n, m):
    weight, x = _correlated_layer(3, rows=8, columns=64)
    new, keep = sparsegpt_prune(weight, x.T @ x, None, n=n, m=m, block_size=32)
    assert (keep.view(8, -1, m).sum(-1) == n).all()
    assert ((new != 0) == keep).all()
    magnitude = weight.abs().view(8, -1, m).argsort(-1, descending=True)[..., :n]
    ref = torch.zeros(8, 64 // m, m, dtype=torch.bool).scatter_(-1, magnitude, True).view(8, 64)
    assert _error(weight, new, x) < _error(weight, weight * ref, x)
    # The sparsity argument may restate the pattern, never contradict it.
    sparsegpt_prune(weight, x.T @ x, 1 - n / m, n=n, m=m)
    with pytest.raises(ValueError, match=f"contradicts the {n}:{m} pattern"):
        sparsegpt_prune(weight, x.T @ x, 0.7, n=n, m=m)


def test_dead_inputs_are_zeroed_and_pruned_first():
    weight, x = _correlated_layer(5, rows=4, columns=16)
    x[:, [2, 9]] = 0  # two channels that never fire
    new, keep = sparsegpt_prune(weight, x.T @ x, 0.25)
    assert not keep[:, [2, 9]].any()
    assert (new[:, [2, 9]] == 0).all()
    assert int((~keep).sum()) == 16


def test_bf16_weight_round_trips_dtype():
    weight, x = _correlated_layer(6, rows=4, columns=8)
    new, keep = sparsegpt_prune(weight.bfloat16(), x.T @ x, 0.5)
    assert new.dtype == torch.bfloat16
    assert (new[~keep] == 0).all() and int((~keep).sum()) == 16


def test_rejects_bad_arguments():
    weight = torch.ones(4, 8)
    with pytest.raises(ValueError, match="hessian of shape \\(4, 4\\)"):
        sparsegpt_prune(weight, torch.eye(4), 0.5)
    with pytest.raises(ValueError, match="sparsity must be in \\[0, 1\\)"):
        sparsegpt_prune(weight, torch.eye(8), 1.0)
    with pytest.raises(ValueError, match="n:m = 2:3 needs"):
        sparsegpt_prune(weight, torch.eye(8), None, n=2, m=3)
    with pytest.raises(ValueError, match="not positive definite"):
        sparsegpt_prune(weight, -torch.eye(8), 0.5)


def test_prune_layers_uses_each_target_and_leaves_excluded_dense():
    w1, x1 = _correlated_layer(7, rows=4, columns=8)
    w2, x2 = _correlated_layer(8, rows=6, columns=8)
    weights = {"a": w1, "b": w2}
    stats = {"a": {"hessian": x1.T @ x1}, "b": {}}
    new, masks = sparsegpt_prune_layers(weights, stats, {"a": 0.25, "b": 0.0})
    assert int((~masks["a"]).sum()) == 8
    assert masks["b"].all() and new["b"] is w2
    with pytest.raises(ValueError, match="statistics for b hold no hessian"):
        sparsegpt_prune_layers(weights, stats, {"a": 0.25, "b": 0.5})
