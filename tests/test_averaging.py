"""Checkpoint weights and the weighted average of safetensors checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from gradprune.training.averaging import average_checkpoints, checkpoint_weights


def test_uniform_weights():
    assert checkpoint_weights([3.0, 1.0, 2.0, 9.0], "uniform", 0.05) == [0.25] * 4
    assert checkpoint_weights([5.0], "uniform", 1.0) == [1.0]


def test_val_weighted_is_softmax_of_negative_loss_over_temperature():
    # losses 1.0, 1.1 at T = 0.1: raw e^0, e^-1 -> 1/(1+e^-1), e^-1/(1+e^-1)
    got = checkpoint_weights([1.0, 1.1], "val_weighted", 0.1)
    assert got == pytest.approx([0.7310585786, 0.2689414214])
    # losses 2.0, 2.5, 3.0 at T = 0.5: raw 1, e^-1, e^-2 over 1.5032147244
    got = checkpoint_weights([2.0, 2.5, 3.0], "val_weighted", 0.5)
    assert got == pytest.approx([0.6652409558, 0.2447284711, 0.0900305732])
    assert sum(got) == pytest.approx(1.0)
    # equal losses give uniform weights; the best need not come first
    assert checkpoint_weights([0.7, 0.7], "val_weighted", 0.05) == pytest.approx([0.5, 0.5])
    got = checkpoint_weights([3.1, 3.0], "val_weighted", 1.0)
    assert got == pytest.approx([math.exp(-0.1) / (1 + math.exp(-0.1)), 1 / (1 + math.exp(-0.1))])


def test_val_weighted_is_stable_for_large_losses_and_small_temperature():
    got = checkpoint_weights([1000.0, 1000.05, 1010.0], "val_weighted", 0.05)
    e = math.exp(-1.0)
    assert got == pytest.approx([1 / (1 + e), e / (1 + e), 0.0], abs=1e-12)
    assert all(math.isfinite(w) for w in got)


def test_unknown_method_and_empty_list():
    with pytest.raises(ValueError, match="average.method: got 'soup'; allowed: 'uniform', "
                                         "'val_weighted'"):
        checkpoint_weights([1.0], "soup", 0.05)
    with pytest.raises(ValueError, match="no checkpoints"):
        checkpoint_weights([], "uniform", 0.05)


def _write(tmp_path, name, tensors):
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def test_average_is_weighted_sum(tmp_path):
    paths = [
        _write(tmp_path, "c1.safetensors", {"w": torch.tensor([[1.0, 2.0], [0.0, 4.0]]),
                                            "b": torch.tensor([8.0])}),
        _write(tmp_path, "c2.safetensors", {"w": torch.tensor([[3.0, -2.0], [0.0, 0.0]]),
                                            "b": torch.tensor([0.0])}),
        _write(tmp_path, "c3.safetensors", {"w": torch.tensor([[5.0, 6.0], [0.0, 8.0]]),
                                            "b": torch.tensor([4.0])}),
    ]
    merged = average_checkpoints(paths, [0.5, 0.25, 0.25])
    assert sorted(merged) == ["b", "w"]
    # 0.5*1 + 0.25*3 + 0.25*5 = 2.5 ; 0.5*2 - 0.5 + 1.5 = 2 ; 0 ; 2 + 0 + 2 = 4
    assert merged["w"].tolist() == [[2.5, 2.0], [0.0, 4.0]]
    assert merged["b"].tolist() == [5.0]
    assert merged["w"].dtype == torch.float32


def test_average_keeps_dtype_and_matches_fp64_reference(tmp_path):
    g = torch.Generator().manual_seed(0)
    states = [{"x": torch.randn(4, 5, generator=g)} for _ in range(3)]
    weights = checkpoint_weights([2.1, 2.0, 2.3], "val_weighted", 0.2)
    paths = [_write(tmp_path, f"c{i}.safetensors", s) for i, s in enumerate(states)]
    merged = average_checkpoints(paths, weights)
    ref = sum(w * s["x"].double() for w, s in zip(weights, states)).float()
    assert torch.equal(merged["x"], ref)
    bf = [_write(tmp_path, f"h{i}.safetensors", {"x": s["x"].bfloat16()})
          for i, s in enumerate(states)]
    assert average_checkpoints(bf, weights)["x"].dtype == torch.bfloat16


def test_zeros_shared_by_all_checkpoints_stay_exactly_zero(tmp_path):
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(16, 8, generator=g) < 0.5
    paths = [_write(tmp_path, f"c{i}.safetensors", {"w": torch.randn(16, 8, generator=g) * mask})
             for i in range(4)]
    weights = checkpoint_weights([1.3, 1.1, 1.2, 1.0], "val_weighted", 0.07)
    merged = average_checkpoints(paths, weights)["w"]
    assert (merged[~mask] == 0).all()
    assert (merged[mask] != 0).all()


def test_missing_checkpoint_names_path(tmp_path):
    first = _write(tmp_path, "c1.safetensors", {"w": torch.ones(2)})
    missing = tmp_path / "c2.safetensors"
    with pytest.raises(FileNotFoundError, match=f"{missing}: checkpoint missing"):
        average_checkpoints([first, missing], [0.5, 0.5])


def test_mismatched_checkpoints_rejected(tmp_path):
    first = _write(tmp_path, "c1.safetensors", {"w": torch.ones(2)})
    other = _write(tmp_path, "c2.safetensors", {"v": torch.ones(2)})
    with pytest.raises(ValueError, match=f"{other}: holds other tensors"):
        average_checkpoints([first, other], [0.5, 0.5])
    with pytest.raises(ValueError):  # one weight per checkpoint
        average_checkpoints([first, first], [1.0])
