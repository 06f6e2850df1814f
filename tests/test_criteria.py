"""Criteria: known scores and masks on one hand-sized layer, for every criterion and variant."""

from __future__ import annotations

import pytest
import torch

from gradprune.pruning.criteria import CRITERIA, scores_for
from gradprune.pruning.masks import masks_for_sparsity

T, F = True, False

# One 2 x 4 layer. Every value is a small dyadic fraction, so every score below is exact in
# float32 and can be checked by hand. E|g| >= |E[g]| and E[g^2] >= (E|g|)^2, as real
# statistics are.
WEIGHTS = {"w": torch.tensor([[1.0, -2.0, 0.5, 4.0], [-3.0, 0.25, 2.0, -1.0]])}
STATS = {"w": {
    "grad_mean": torch.tensor([[0.5, 0.25, -1.0, 0.25], [-0.25, 2.0, 0.5, -0.5]]),
    "grad_abs_mean": torch.tensor([[1.0, 0.5, 1.0, 0.25], [0.5, 2.0, 1.5, 1.0]]),
    "grad_sq_mean": torch.tensor([[1.0, 0.25, 1.0, 0.25], [0.25, 4.0, 4.0, 1.0]]),
    "act_norm": torch.tensor([0.5, 0.25, 1.0, 0.25]),
}}

# criterion, options -> (scores, per_layer mask at 50%, per_row mask at 50%), written out.
# per_layer prunes the 4 lowest of 8, per_row the 2 lowest of each row; ties go by position.
CASES = {
    # |E[g]|: 0.25 x3 (r0c1 r0c3 r1c0) and then the first 0.5 (r0c0) go
    ("gradient", "mean"): ([[0.5, 0.25, 1.0, 0.25], [0.25, 2.0, 0.5, 0.5]],
                           [[F, F, T, F], [F, T, T, T]], [[T, F, T, F], [F, T, F, T]]),
    # E|g|
    ("gradient", "abs_mean"): ([[1.0, 0.5, 1.0, 0.25], [0.5, 2.0, 1.5, 1.0]],
                               [[F, F, T, F], [F, T, T, T]], [[T, F, T, F], [F, T, T, F]]),
    # sqrt(E[g^2])
    ("gradient", "rms"): ([[1.0, 0.5, 1.0, 0.5], [0.5, 2.0, 2.0, 1.0]],
                          [[F, F, T, F], [F, T, T, T]], [[T, F, T, F], [F, T, T, F]]),
    # |w E[g]|: five ties at 0.5
    ("taylor", "mean"): ([[0.5, 0.5, 0.5, 1.0], [0.75, 0.5, 1.0, 0.5]],
                         [[F, F, F, T], [T, F, T, T]], [[F, F, T, T], [T, F, T, F]]),
    # |w| E|g|
    ("taylor", "abs_mean"): ([[1.0, 1.0, 0.5, 1.0], [1.5, 0.5, 3.0, 1.0]],
                             [[F, F, F, T], [T, F, T, T]], [[F, T, F, T], [T, F, T, F]]),
    # 0.5 w^2 E[g^2]
    ("fisher", "mean"): ([[0.5, 0.5, 0.125, 2.0], [1.125, 0.125, 8.0, 0.5]],
                         [[F, F, F, T], [T, F, T, T]], [[F, T, F, T], [T, F, T, F]]),
    ("magnitude", "mean"): ([[1.0, 2.0, 0.5, 4.0], [3.0, 0.25, 2.0, 1.0]],
                            [[F, T, F, T], [T, F, T, F]], [[F, T, F, T], [T, F, T, F]]),
    # |w| * ||x_j|| with ||x|| = [0.5, 0.25, 1, 0.25]
    ("wanda", "mean"): ([[0.5, 0.5, 0.5, 1.0], [1.5, 0.0625, 2.0, 0.25]],
                        [[F, F, T, T], [T, F, T, F]], [[F, F, T, T], [T, F, T, F]]),
}


def _masks(scores, scope):
    return masks_for_sparsity(scores, 0.5, scope)["w"].tolist()


@pytest.mark.parametrize("criterion, variant", list(CASES))
def test_known_scores_and_masks(criterion, variant):
    want_scores, want_layer, want_row = CASES[criterion, variant]
    scores = scores_for(criterion, WEIGHTS, STATS, variant=variant)
    assert scores["w"].dtype == torch.float32 and scores["w"].is_contiguous()
    assert scores["w"].tolist() == want_scores
    assert _masks(scores, "per_layer") == want_layer
    assert _masks(scores, "per_row") == want_row


def test_default_variant_is_the_mean_gradient():
    assert torch.equal(scores_for("gradient", WEIGHTS, STATS)["w"],
                       scores_for("gradient", WEIGHTS, STATS, variant="mean")["w"])
    assert torch.equal(scores_for("taylor", WEIGHTS, STATS)["w"],
                       scores_for("taylor", WEIGHTS, STATS, variant="mean")["w"])


def test_wanda_compares_within_rows():
    # Prune 1 of 4 per row vs 2 of 8 per layer: row 1 holds the two lowest scores of the
    # layer, so per_layer takes both from it, while per_row takes one from each row (the tie
    # at 0.5 in row 0 goes to its first position).
    scores = scores_for("wanda", WEIGHTS, STATS)
    assert masks_for_sparsity(scores, 0.25, "per_layer")["w"].tolist() == \
        [[T, T, T, T], [T, F, T, F]]
    assert masks_for_sparsity(scores, 0.25, "per_row")["w"].tolist() == \
        [[F, T, T, T], [T, F, T, T]]


def test_gblm_known_scores():
    # ||G|| = sqrt(4 E[g^2]) = [[2, 1, 2, 1], [1, 4, 4, 2]];
    # |w| * (||x|| + 0.25 ||G||) = |w| * [[1, .5, 1.5, .5], [.75, 1.25, 2, .75]]
    scores = scores_for("gblm", WEIGHTS, STATS, gblm_alpha=0.25, n_blocks=4)["w"]
    assert scores.tolist() == [[1.0, 1.0, 0.75, 2.0], [2.25, 0.3125, 4.0, 0.75]]
    assert _masks({"w": scores}, "per_row") == [[F, T, F, T], [T, F, T, F]]
    # Default alpha: the reference's 100, times sqrt(4) for our unnormalised ||x||.
    default = scores_for("gblm", WEIGHTS, STATS, n_blocks=4)["w"]
    assert default.tolist() == [[400.5, 400.5, 200.5, 801.0], [601.5, 200.0625, 1602.0, 400.25]]
    with pytest.raises(ValueError, match="gblm needs the number of calibration blocks"):
        scores_for("gblm", WEIGHTS, STATS, gblm_alpha=1.0)


def test_random_is_seeded_per_tensor():
    weights = {"w": WEIGHTS["w"], "v": torch.zeros(3, 5)}
    stats = {"w": STATS["w"], "v": {}}
    first = scores_for("random", weights, stats, seed=3)
    again = scores_for("random", {"v": weights["v"], "w": weights["w"]}, stats, seed=3)
    alone = scores_for("random", {"w": weights["w"]}, stats, seed=3)
    other = scores_for("random", weights, stats, seed=4)
    for name in weights:
        assert first[name].shape == weights[name].shape
        assert ((first[name] >= 0) & (first[name] < 1)).all()
        assert torch.equal(first[name], again[name])
        assert not torch.equal(first[name], other[name])
    assert torch.equal(first["w"], alone["w"])
    assert not torch.equal(first["w"].reshape(-1)[:8], first["v"].reshape(-1)[:8])


def test_bf16_weights_score_in_float32():
    scores = scores_for("magnitude", {"w": WEIGHTS["w"].bfloat16()}, STATS)
    assert scores["w"].dtype == torch.float32
    assert scores["w"].tolist() == CASES["magnitude", "mean"][0]


def test_criteria_names_and_errors():
    assert set(CRITERIA) == {"gradient", "taylor", "fisher", "magnitude", "wanda", "gblm",
                             "sparsegpt", "random"}
    with pytest.raises(ValueError, match="masks.criterion: got 'obd'; allowed: gradient, "):
        scores_for("obd", WEIGHTS, STATS)
    with pytest.raises(ValueError, match="sparsegpt_prune"):
        scores_for("sparsegpt", WEIGHTS, STATS)
    with pytest.raises(ValueError, match="masks.variant: got 'rms'; allowed for taylor"):
        scores_for("taylor", WEIGHTS, STATS, variant="rms")
    with pytest.raises(ValueError, match="masks.variant: got 'l1'; allowed for gradient"):
        scores_for("gradient", WEIGHTS, STATS, variant="l1")
    with pytest.raises(ValueError, match="only gradient and taylor have variants"):
        scores_for("magnitude", WEIGHTS, STATS, variant="abs_mean")


def test_gblm_reads_n_blocks_from_a_saved_stats_file(tmp_path):
    from gradprune.pruning.stats import load_stats, load_stats_info, save_stats

    path = tmp_path / "stats.safetensors"
    stats = {"w": {**STATS["w"], "hessian": torch.eye(4)}}
    save_stats(path, stats, {"calibration_blocks": 4, "block_size": 16})
    back = load_stats(path)
    assert sorted(back["w"]) == sorted(stats["w"])
    assert all(torch.equal(back["w"][k], v) for k, v in stats["w"].items())
    info = load_stats_info(path)
    assert info == {"calibration_blocks": 4, "block_size": 16}
    scores = scores_for("gblm", WEIGHTS, back, gblm_alpha=0.25,
                        n_blocks=info["calibration_blocks"])
    assert scores["w"].tolist() == [[1.0, 1.0, 0.75, 2.0], [2.25, 0.3125, 4.0, 0.75]]
    with pytest.raises(FileNotFoundError, match="run the gradients stage"):
        load_stats_info(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt statistics"):
        load_stats_info(tmp_path / "bad.safetensors")
