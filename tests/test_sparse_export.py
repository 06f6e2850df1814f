"""Sparse checkpoints: bit-identical round trips, -0.0 included, and the size at 50%."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradprune.export.sparse import load_sparse, save_sparse, sparse_size_report
from gradprune.pruning.masks import masks_for_sparsity


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).contiguous().view(torch.uint8)


def assert_bit_identical(loaded: dict, saved: dict) -> None:
    assert sorted(loaded) == sorted(saved)
    for name, tensor in saved.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(bits(loaded[name]), bits(tensor)), name


def magnitude_pruned(shape: tuple[int, ...], sparsity: float, dtype: torch.dtype,
                     seed: int) -> torch.Tensor:
    """normal(0, 0.02) weights, the smallest pruned by multiplying with the mask as the
    pipeline does, which leaves -0.0 at pruned negative weights."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    mask = masks_for_sparsity({"w": weight.abs()}, sparsity)["w"]
    return (weight * mask).to(dtype)


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       sparsity=st.floats(0, 1), negative_zeros=st.booleans(), seed=st.integers(0, 2**16))
def test_round_trip_is_bit_identical(tmp_path_factory, shape, dtype, sparsity, negative_zeros,
                                     seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator).to(dtype)
    weight[torch.rand(shape, generator=generator) < sparsity] = -0.0 if negative_zeros else 0.0
    if weight.numel() > 1:
        weight.view(-1)[0] = float("nan")
    state = {"w": weight, "dense": torch.randn(3, 2).to(dtype), "step": torch.tensor(7)}
    path = tmp_path_factory.mktemp("sparse") / "model.safetensors"
    save_sparse(state, path)
    assert_bit_identical(load_sparse(path), state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_sparse_is_at_most_055_of_dense(tmp_path, dtype):
    state = {f"layers.{i}.mlp.up_proj.weight": magnitude_pruned((256, 688), 0.5, dtype, seed=i)
             for i in range(2)}
    state["embed.weight"] = torch.randn(64, 256).to(dtype)
    path = tmp_path / "model.safetensors"
    save_sparse(state, path)
    assert_bit_identical(load_sparse(path), state)
    report = sparse_size_report(path)
    assert report["sparse_tensors"]["count"] == 2
    assert report["sparse_tensors"]["ratio"] <= 0.55
    assert report["dense_bytes"] == (2 * 256 * 688 + 64 * 256) * dtype.itemsize
    assert report["file_bytes"] == path.stat().st_size


def test_same_state_gives_the_same_file(tmp_path):
    state = {"a.weight": magnitude_pruned((32, 16), 0.5, torch.float32, seed=0),
             "b.weight": magnitude_pruned((8, 16), 0.7, torch.bfloat16, seed=1),
             "c": torch.ones(4)}
    save_sparse(state, tmp_path / "one.safetensors")
    save_sparse(state, tmp_path / "two.safetensors")
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    assert one.read_bytes() == two.read_bytes()


def test_masks_force_sparse_and_must_match_the_zeros(tmp_path):
    weight = torch.tensor([[1.0, 0.0], [-0.0, 2.0]])
    # No zeros here, so only the mask makes it sparse; tied tensors share memory.
    embed = torch.randn(4, 2)
    state = {"proj.weight": weight, "dense.weight": torch.ones(2, 2),
             "embed.weight": embed, "lm_head.weight": embed}
    mask = torch.tensor([[True, False], [False, True]])
    path = tmp_path / "model.safetensors"
    save_sparse(state, path, masks={"proj": mask, "dense": torch.ones(2, 2, dtype=torch.bool)})
    assert sparse_size_report(path)["sparse_tensors"]["count"] == 2
    assert_bit_identical(load_sparse(path), state)
    with pytest.raises(ValueError, match="apply the masks"):
        save_sparse(state, path, masks={"proj": ~mask})
    with pytest.raises(ValueError, match="another model"):
        save_sparse(state, path, masks={"proj": torch.ones(3, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not in the state dict"):
        save_sparse(state, path, masks={"nope": mask})


def test_corrupt_or_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_sparse(tmp_path / "absent.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt sparse checkpoint"):
        load_sparse(bad)
