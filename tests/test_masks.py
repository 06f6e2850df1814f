"""Masks from scores: known answers on hand-sized tensors, exact counts, packing, files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradprune.pruning import masks as masks_mod
from gradprune.pruning.criteria import scores_for
from gradprune.pruning.masks import (
    check_scores,
    keep_top,
    kth_smallest,
    load_masks,
    masks_for_n_m,
    masks_for_sparsity,
    masks_for_targets,
    masks_for_threshold,
    pack_mask,
    save_masks,
    sparsity_targets,
    unpack_mask,
)

T, F = True, False

# Hand-sized weights and gradient means, all exactly representable in float32 so every score
# below is exact and the expected masks can be read off by hand.
WEIGHTS = {
    "a": torch.tensor([[1.0, -2.0, 3.0], [-0.5, 0.0, 4.0]]),
    "b": torch.tensor([[2.5, -1.5], [0.25, 5.0]]),
}
STATS = {
    "a": {"grad_mean": torch.tensor([[0.125, -0.5, 0.0625], [0.375, -0.25, 0.0]])},
    "b": {"grad_mean": torch.tensor([[-0.75, 0.1875], [0.4375, -0.03125]])},
}
# The scores each criterion must give (written out, not recomputed):
SCORES = {
    "gradient": {"a": [[0.125, 0.5, 0.0625], [0.375, 0.25, 0.0]],
                 "b": [[0.75, 0.1875], [0.4375, 0.03125]]},
    "magnitude": {"a": [[1.0, 2.0, 3.0], [0.5, 0.0, 4.0]],
                  "b": [[2.5, 1.5], [0.25, 5.0]]},
    "taylor": {"a": [[0.125, 1.0, 0.1875], [0.1875, 0.0, 0.0]],
               "b": [[1.875, 0.28125], [0.109375, 0.15625]]},
}


def _scores(criterion):
    return scores_for(criterion, WEIGHTS, STATS)


def _assert_masks(got, expected):
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert got[name].dtype == torch.bool
        assert got[name].tolist() == want, name


@pytest.mark.parametrize("criterion", ["gradient", "magnitude", "taylor"])
def test_scores_per_criterion(criterion):
    scores = _scores(criterion)
    for name, want in SCORES[criterion].items():
        assert scores[name].dtype == torch.float32
        assert scores[name].is_contiguous()
        assert scores[name].tolist() == want


def test_unknown_criterion_names_allowed():
    with pytest.raises(ValueError, match="masks.criterion.*gradient, taylor, fisher, magnitude"):
        scores_for("obd", WEIGHTS, STATS)


@pytest.mark.parametrize("criterion, tau, expected", [
    # keep where score > tau
    ("gradient", 0.2, {"a": [[F, T, F], [T, T, F]], "b": [[T, F], [T, F]]}),
    # 1.5 equals tau and is pruned: the rule is strict
    ("magnitude", 1.5, {"a": [[F, T, T], [F, F, T]], "b": [[T, F], [F, T]]}),
    ("taylor", 0.1875, {"a": [[F, T, F], [F, F, F]], "b": [[T, T], [F, F]]}),
    # tau = 0 prunes exactly the zero scores
    ("taylor", 0.0, {"a": [[T, T, T], [T, F, F]], "b": [[T, T], [T, T]]}),
])
def test_threshold_known_answers(criterion, tau, expected):
    _assert_masks(masks_for_threshold(_scores(criterion), tau), expected)


@pytest.mark.parametrize("criterion, sparsity, scope, expected", [
    # gradient, all ten sorted: 0(a5) .03125(b3) .0625(a2) .125(a0) .1875(b1) .25(a4) ...
    ("gradient", 0.4, "global", {"a": [[F, T, F], [T, T, F]], "b": [[T, T], [T, F]]}),
    # per layer: a prunes round(2.4)=2 (a5, a2), b prunes round(1.6)=2 (b3, b1)
    ("gradient", 0.4, "per_layer", {"a": [[T, T, F], [T, T, F]], "b": [[T, F], [T, F]]}),
    # magnitude sorted: 0(a4) .25(b2) .5(a3) 1(a0) 1.5(b1) 2(a1) ...
    ("magnitude", 0.4, "global", {"a": [[F, T, T], [F, F, T]], "b": [[T, T], [F, T]]}),
    ("magnitude", 0.4, "per_layer", {"a": [[T, T, T], [F, F, T]], "b": [[T, F], [F, T]]}),
    # taylor sorted: 0(a4) 0(a5) .109375(b2) .125(a0) .15625(b3) .1875(a2) .1875(a3) ...
    ("taylor", 0.4, "global", {"a": [[F, T, T], [T, F, F]], "b": [[T, T], [F, T]]}),
    # six pruned: the tie at .1875 splits, and a2 (lower flat index) goes before a3
    ("taylor", 0.6, "global", {"a": [[F, T, F], [T, F, F]], "b": [[T, T], [F, F]]}),
    ("taylor", 0.4, "per_layer", {"a": [[T, T, T], [T, F, F]], "b": [[T, T], [F, F]]}),
    # per row: a's rows of 3 prune round(1.2)=1, b's rows of 2 prune round(0.8)=1
    ("magnitude", 0.4, "per_row", {"a": [[F, T, T], [T, F, T]], "b": [[T, F], [F, T]]}),
    # taylor a row 1 is [.1875, 0, 0]: the tie goes to the first position
    ("taylor", 0.4, "per_row", {"a": [[F, T, T], [T, F, T]], "b": [[T, F], [F, T]]}),
])
def test_sparsity_known_answers(criterion, sparsity, scope, expected):
    _assert_masks(masks_for_sparsity(_scores(criterion), sparsity, scope), expected)


def test_ties_broken_by_sorted_name_then_flat_index():
    # Four scores tie at 1.0: m[0], m[2] (name "m" sorts first) then z[0,1], z[1,0].
    # The dict is deliberately not in name order.
    scores = {"z": torch.tensor([[0.5, 1.0], [1.0, 2.0]]), "m": torch.tensor([1.0, 3.0, 1.0])}
    three = keep_top(scores, 3)  # 0.5 and the first two tied: m[0], m[2]
    assert three["m"].tolist() == [F, T, F]
    assert three["z"].tolist() == [[F, T], [T, T]]
    four = keep_top(scores, 4)  # ... and then z[0, 1]
    assert four["m"].tolist() == [F, T, F]
    assert four["z"].tolist() == [[F, F], [T, T]]
    # Same answer through the public entry point (4 of 7 -> sparsity 4/7)
    _assert_masks(masks_for_sparsity(scores, 4 / 7), {"m": [F, T, F], "z": [[F, F], [T, T]]})


@pytest.mark.parametrize("scope", ["global", "per_layer", "per_row"])
def test_sparsity_zero_keeps_everything(scope):
    got = masks_for_sparsity(_scores("magnitude"), 0.0, scope)
    _assert_masks(got, {"a": [[T, T, T], [T, T, T]], "b": [[T, T], [T, T]]})


def test_unknown_scope_rejected():
    with pytest.raises(ValueError, match="masks.scope.*'global', 'per_layer', 'per_row'"):
        masks_for_sparsity(_scores("magnitude"), 0.5, "per_column")


def test_check_scores_rejects_nan_inf_negative_and_wrong_dtype():
    check_scores("ok", torch.tensor([0.0, -0.0, 1.5]))  # -0.0 is not negative
    for bad in ([0.0, float("nan")], [1.0, -0.5], [float("inf")]):
        with pytest.raises(ValueError, match="scores for layer.x hold negative, NaN or inf"):
            check_scores("layer.x", torch.tensor(bad))
    with pytest.raises(TypeError, match="float32"):
        check_scores("layer.x", torch.tensor([1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="layer.y"):
        masks_for_sparsity({"layer.y": torch.tensor([1.0, float("nan")])}, 0.5)
    with pytest.raises(ValueError, match="layer.y"):
        masks_for_threshold({"layer.y": torch.tensor([-1.0, 2.0])}, 0.5)


@pytest.mark.parametrize("chunk", [masks_mod.CHUNK, 7])
def test_kth_smallest_matches_sort(monkeypatch, chunk):
    monkeypatch.setattr(masks_mod, "CHUNK", chunk)  # 7 exercises the chunked path
    g = torch.Generator().manual_seed(0)
    tensors = [torch.rand(5, 9, generator=g) * 10, torch.rand(31, generator=g) ** 4,
               torch.randint(0, 4, (4, 4), generator=g).float()]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    ordered = torch.sort(flat).values
    for k in [1, 2, 17, 40, 76, 91, flat.numel()]:
        value, below = kth_smallest(tensors, k)
        assert value == ordered[k - 1].item()
        assert below == int((flat < value).sum())
    for k in (0, flat.numel() + 1):
        with pytest.raises(ValueError, match=f"k={k} outside"):
            kth_smallest(tensors, k)


def test_kth_smallest_spans_exponent_range():
    # Tiny subnormals, huge values and zeros: the radix select must order them all.
    values = torch.tensor([3e38, 1e-45, 0.0, 1.0, 1e-38, 65504.0, 2.0 ** -20, -0.0])
    ordered = torch.sort(values.abs()).values
    for k in range(1, 9):
        value, _ = kth_smallest([values.abs()], k)
        assert value == ordered[k - 1].item()


def _reference_masks(scores: dict[str, torch.Tensor], n_prune: int) -> dict[str, list[bool]]:
    """Prune the n lowest by a stable sort over (sorted name, flat index): the documented order."""
    flat = [(float(v), i) for i, v in enumerate(
        torch.cat([scores[n].reshape(-1) for n in sorted(scores)]).tolist())]
    pruned = {i for _, i in sorted(flat)[:n_prune]}
    out, offset = {}, 0
    for name in sorted(scores):
        n = scores[name].numel()
        out[name] = [offset + j not in pruned for j in range(n)]
        offset += n
    return out


_SHAPES = st.lists(st.integers(1, 6), min_size=1, max_size=3)


@st.composite
def _tied_scores(draw):
    """1-4 tensors of small integers cast to float (many ties), with some -0.0 mixed in."""
    names = draw(st.lists(st.sampled_from("qwertyuiop"), min_size=1, max_size=4, unique=True))
    out = {}
    for name in names:
        shape = draw(_SHAPES)
        n = int(np.prod(shape))
        ints = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
        negzero = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        values = [-0.0 if (z and v == 0) else float(v) for v, z in zip(ints, negzero)]
        out[name] = torch.tensor(values, dtype=torch.float32).view(shape)
    return out


@settings(max_examples=60, deadline=None)
@given(_tied_scores(), st.floats(0, 1, exclude_max=True))
def test_global_sparsity_prunes_exact_count_in_position_order(scores, sparsity):
    total = sum(s.numel() for s in scores.values())
    got = masks_for_sparsity(scores, sparsity, "global")
    assert sum(int((~m).sum()) for m in got.values()) == round(sparsity * total)
    want = _reference_masks(scores, round(sparsity * total))
    for name in scores:
        assert got[name].shape == scores[name].shape
        assert got[name].reshape(-1).tolist() == want[name]


@settings(max_examples=60, deadline=None)
@given(_tied_scores(), st.floats(0, 1, exclude_max=True))
def test_per_layer_sparsity_prunes_exact_count_per_tensor(scores, sparsity):
    got = masks_for_sparsity(scores, sparsity, "per_layer")
    for name, score in scores.items():
        assert int((~got[name]).sum()) == round(sparsity * score.numel())
        want = _reference_masks({name: score}, round(sparsity * score.numel()))
        assert got[name].reshape(-1).tolist() == want[name]


def test_all_equal_scores_prune_first_positions():
    scores = {"l1": torch.zeros(2, 3), "l0": torch.full((4,), -0.0)}
    got = masks_for_sparsity(scores, 0.5, "global")  # 5 of 10, l0 first
    assert got["l0"].tolist() == [F, F, F, F]
    assert got["l1"].tolist() == [[F, T, T], [T, T, T]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=0, max_size=4), st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip_and_numpy_order(shape, seed):
    rng = np.random.default_rng(seed)
    bits = rng.random(shape) < 0.5
    mask = torch.from_numpy(np.asarray(bits, dtype=bool))
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-mask.numel() // 8)
    assert packed.tolist() == np.packbits(np.asarray(bits).reshape(-1)).tolist()
    back = unpack_mask(packed, tuple(shape))
    assert back.dtype == torch.bool
    assert back.shape == mask.shape
    assert torch.equal(back, mask)


def test_pack_mask_known_bytes():
    mask = torch.tensor([T, F, F, F, F, F, F, T, T, T])
    assert pack_mask(mask).tolist() == [0b10000001, 0b11000000]
    assert pack_mask(mask.view(2, 5)[:, ::2]).tolist() == [0b10001100]  # non-contiguous view: T F F F T T


def test_save_load_masks_round_trip(tmp_path):
    masks = {"model.layers.0.mlp.up_proj": torch.rand(5, 3) < 0.5,
             "model.layers.0.self_attn.q_proj": torch.rand(11) < 0.5,
             "empty": torch.zeros(0, 4, dtype=torch.bool)}
    path = tmp_path / "masks.safetensors"
    save_masks(path, masks)
    back = load_masks(path)
    assert sorted(back) == sorted(masks)
    for name, mask in masks.items():
        assert back[name].dtype == torch.bool
        assert torch.equal(back[name], mask)


def test_load_masks_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=str(path)):
        load_masks(path)


def test_load_masks_corrupt_files_name_path(tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_masks(good, {"w": torch.ones(20, dtype=torch.bool)})
    corrupt = {
        "garbage.safetensors": b"not a safetensors file at all",
        "truncated.safetensors": good.read_bytes()[:-1],
    }
    for name, data in corrupt.items():
        (tmp_path / name).write_bytes(data)
    # Valid safetensors, but not a mask file: no metadata at all, or shapes that disagree.
    save_file({"w": torch.zeros(3, dtype=torch.uint8)}, str(tmp_path / "nometa.safetensors"))
    save_file({"w": torch.zeros(1, dtype=torch.uint8)}, str(tmp_path / "badshape.safetensors"),
              metadata={"gradprune.mask_shapes": '{"w": [4, 4]}'})
    for name in [*corrupt, "nometa.safetensors", "badshape.safetensors"]:
        path = tmp_path / name
        with pytest.raises(ValueError, match=f"{path}: corrupt mask file"):
            load_masks(path)


# --- per-row, N:M and per-tensor targets ----------------------------------------------------

def test_per_row_prunes_within_each_row_ties_by_position():
    scores = {"w": torch.tensor([[3.0, 1.0, 1.0, 1.0], [0.0, 9.0, 8.0, 7.0]])}
    # Row 0 loses two of its three tied 1.0s (the first two); row 1 its 0 and its 7.
    _assert_masks(masks_for_sparsity(scores, 0.5, "per_row"), {"w": [[T, F, F, T], [F, T, T, F]]})
    # A 1-D tensor is one row.
    got = masks_for_sparsity({"v": torch.tensor([2.0, 0.0, 1.0])}, 0.34, "per_row")
    assert got["v"].tolist() == [T, F, T]


def _reference_row_mask(row: list[float], n_prune: int) -> list[bool]:
    pruned = set(sorted(range(len(row)), key=lambda j: (row[j], j))[:n_prune])
    return [j not in pruned for j in range(len(row))]


@settings(max_examples=60, deadline=None)
@given(_tied_scores(), st.floats(0, 1, exclude_max=True))
def test_per_row_sparsity_prunes_exact_count_per_row(scores, sparsity):
    got = masks_for_sparsity(scores, sparsity, "per_row")
    for name, score in scores.items():
        rows = score.reshape(score.shape[0], -1) if score.dim() > 1 else score.reshape(1, -1)
        mask = got[name].reshape(rows.shape)
        for row, keep in zip(rows.tolist(), mask.tolist()):
            assert keep.count(False) == round(sparsity * len(row))
            # -0.0 and 0.0 tie: compare as the radix select does, by value
            assert keep == _reference_row_mask([abs(v) for v in row], round(sparsity * len(row)))


@pytest.mark.parametrize("n, m, expected", [
    (2, 4, [[T, F, T, F, F, F, T, T], [F, F, T, T, F, F, T, T]]),
    # of the two 1.0s in row 0, the earlier one goes
    (4, 8, [[T, F, T, T, F, F, F, T], [F, F, F, F, T, T, T, T]]),
    (1, 2, [[T, F, T, F, F, T, F, T], [F, T, F, T, F, T, F, T]]),
])
def test_n_m_known_answers(n, m, expected):
    scores = {"w": torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.5, 0.5, 1.0],
                                 [0.0, 0.0, 0.0, 0.0, 5.0, 6.0, 7.0, 8.0]])}
    _assert_masks(masks_for_n_m(scores, n, m), {"w": expected})


def test_n_m_rejects_bad_shapes_and_patterns():
    with pytest.raises(ValueError, match="layers.3.down_proj: input dimension.*multiple of m=4"):
        masks_for_n_m({"layers.3.down_proj": torch.ones(4, 6)}, 2, 4)
    for n, m in [(0, 4), (4, 4), (3, 2)]:
        with pytest.raises(ValueError, match=f"need 0 < n < m, got {n}:{m}"):
            masks_for_n_m({"w": torch.ones(4, 8)}, n, m)
    with pytest.raises(ValueError, match="scores for w hold negative"):
        masks_for_n_m({"w": -torch.ones(4, 8)}, 2, 4)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.sampled_from([(2, 4), (4, 8), (1, 4), (3, 4)]),
       st.integers(0, 2**31 - 1))
def test_n_m_every_group_keeps_exactly_n_highest(rows, groups, n_m, seed):
    n, m = n_m
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 3, (rows, groups * m), generator=g).float()
    keep = masks_for_n_m({"w": score}, n, m)["w"]
    assert (keep.view(rows, groups, m).sum(-1) == n).all()
    grouped, kept = score.view(-1, m).tolist(), keep.view(-1, m).tolist()
    for values, mask in zip(grouped, kept):
        assert mask == _reference_row_mask(values, m - n)


# Two module types across two layers plus one unmatched tensor (rows of 4, one row each).
TYPED = {
    "l0.mlp.up": torch.tensor([[1.0, 2.0, 3.0, 4.0]]),
    "l1.mlp.up": torch.tensor([[5.0, 6.0, 7.0, 8.0]]),
    "l0.self_attn.q": torch.tensor([[0.5, 8.0, 8.0, 8.0]]),
    "l1.self_attn.q": torch.tensor([[4.0, 4.0, 0.25, 4.0]]),
    "out": torch.tensor([[0.125, 0.125, 0.125, 0.125]]),
}
OVERRIDES = {"*.mlp.*": 0.5, "*.self_attn.*": 0.25}


def test_sparsity_targets_first_match_wins_exclude_and_default():
    names = list(TYPED)
    assert sparsity_targets(names, 0.5, OVERRIDES) == {
        "l0.mlp.up": 0.5, "l1.mlp.up": 0.5, "l0.self_attn.q": 0.25, "l1.self_attn.q": 0.25,
        "out": 0.5}
    # Both patterns match l0.self_attn.q: the first written wins.
    assert sparsity_targets(["l0.self_attn.q", "l1.mlp.up"], 0.3,
                            {"*.q": 0.1, "l0.*": 0.9, "l1.*": 0.7}) == \
        {"l0.self_attn.q": 0.1, "l1.mlp.up": 0.7}
    assert sparsity_targets(names, 0.6, OVERRIDES, exclude=["l1.*", "out"]) == {
        "l0.mlp.up": 0.5, "l1.mlp.up": 0.0, "l0.self_attn.q": 0.25, "l1.self_attn.q": 0.0,
        "out": 0.0}
    assert sparsity_targets(names, 0.5) == dict.fromkeys(names, 0.5)


def test_per_module_overrides_select_each_target_group_jointly():
    targets = sparsity_targets(TYPED, 0.5, OVERRIDES)
    # Target 0.5 holds both mlp tensors and "out" (12 weights, prune 6): out's four 0.125s and
    # l0's 1 and 2; l1.mlp.up keeps everything. Target 0.25 holds the attention tensors
    # (8 weights, prune 2): 0.25 in l1 and 0.5 in l0.
    _assert_masks(masks_for_targets(TYPED, targets, "global"), {
        "l0.mlp.up": [[F, F, T, T]], "l1.mlp.up": [[T, T, T, T]],
        "l0.self_attn.q": [[F, T, T, T]], "l1.self_attn.q": [[T, T, F, T]],
        "out": [[F, F, F, F]]})
    per_layer = {"l0.mlp.up": [[F, F, T, T]], "l1.mlp.up": [[F, F, T, T]],
                 "l0.self_attn.q": [[F, T, T, T]], "l1.self_attn.q": [[T, T, F, T]],
                 "out": [[F, F, T, T]]}
    _assert_masks(masks_for_targets(TYPED, targets, "per_layer"), per_layer)
    _assert_masks(masks_for_targets(TYPED, targets, "per_row"), per_layer)  # one row each
    # Excluded tensors stay dense.
    excluded = masks_for_targets(TYPED, sparsity_targets(TYPED, 0.5, OVERRIDES, ["*.mlp.*"]))
    assert excluded["l0.mlp.up"].all() and excluded["l1.mlp.up"].all()


def test_targets_must_name_the_scored_tensors():
    with pytest.raises(ValueError, match="l1.mlp.up: has a score or a sparsity target"):
        masks_for_targets(TYPED, {n: 0.5 for n in TYPED if n != "l1.mlp.up"})


@settings(max_examples=60, deadline=None)
@given(_tied_scores(), st.data())
def test_targets_prune_exact_counts_per_group_tensor_and_row(scores, data):
    targets = {name: data.draw(st.sampled_from([0.0, 0.25, 0.5, 0.7])) for name in scores}
    glob = masks_for_targets(scores, targets, "global")
    for target in set(targets.values()):
        group = [name for name in scores if targets[name] == target]
        pruned = sum(int((~glob[name]).sum()) for name in group)
        assert pruned == round(target * sum(scores[name].numel() for name in group))
    layer = masks_for_targets(scores, targets, "per_layer")
    row = masks_for_targets(scores, targets, "per_row")
    for name, score in scores.items():
        # round(): within half a weight of the asked fraction, so within one weight
        assert abs(int((~layer[name]).sum()) - targets[name] * score.numel()) <= 0.5
        rows = row[name].reshape(score.shape[0], -1) if score.dim() > 1 else row[name].view(1, -1)
        assert ((~rows).sum(1) == round(targets[name] * rows.shape[1])).all()
