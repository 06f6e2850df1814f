"""Data-parallel stages: gradients and finetune under `torchrun --nproc_per_node=2` (gloo on
CPU) equal the single-process run up to the order of floating-point additions.

The single-process side is what `dvc repro` made (gradients) or `python -m tasks.finetune`
makes, in fp32; the two-process side runs the same stage CLIs in a copy of the repository.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from conftest import copy_repo, run, run_env
from safetensors.torch import load_file

# Whole pipelines in subprocesses: the slow half of the suite.
pytestmark = pytest.mark.integration

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# fp32 sums of the same terms in another order; atol covers entries that are sums of
# cancelling terms (E[g] near zero), where a relative bound means nothing.
RTOL, ATOL = 1e-5, 1e-7


@pytest.fixture(scope="module")
def repos(micro_upstream, session_tmp):
    """(single-process repo, two-process repo), each after gradients and finetune."""
    env = run_env(session_tmp)
    single = copy_repo(micro_upstream, session_tmp / "dp-single")
    double = copy_repo(micro_upstream, session_tmp / "dp-double")
    shutil.rmtree(double / "data" / "gradients")
    run(TORCHRUN + ["-m", "tasks.gradients"], double, env, timeout=900)
    # Both fine-tune from the single-process masks, so only the training loop differs.
    run([sys.executable, "-m", "tasks.finetune"], single, env, timeout=900)
    run(TORCHRUN + ["-m", "tasks.finetune"], double, env, timeout=900)
    return single, double


def test_gradient_statistics_equal_the_single_process_ones(repos):
    from gradprune.pruning.stats import load_stats, load_stats_info

    single, double = repos
    one = load_stats(single / "data/gradients/stats.safetensors")
    two = load_stats(double / "data/gradients/stats.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        assert one[name].keys() == two[name].keys() == {
            "grad_mean", "grad_abs_mean", "grad_sq_mean", "act_norm", "hessian"}
        for stat in one[name]:
            torch.testing.assert_close(two[name][stat], one[name][stat], rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"{name}.{stat}: {m}")
    assert load_stats_info(double / "data/gradients/stats.safetensors") == \
        load_stats_info(single / "data/gradients/stats.safetensors")
    m1 = json.loads((single / "metrics/gradients.json").read_text())
    m2 = json.loads((double / "metrics/gradients.json").read_text())
    assert (m1["processes"], m2["processes"]) == (1, 2)
    assert m2["calibration_blocks"] == m1["calibration_blocks"] == 8
    assert m2["calibration_loss"] == pytest.approx(m1["calibration_loss"], rel=1e-6)


def test_finetuned_weights_equal_the_single_process_ones_and_stay_pruned(repos):
    from gradprune.pruning.masks import load_masks

    single, double = repos
    masks = load_masks(single / "data/masks/masks.safetensors")
    files = sorted(p.name for p in (single / "data/finetune").glob("*.safetensors"))
    assert files == sorted(p.name for p in (double / "data/finetune").glob("*.safetensors"))
    assert len(files) == 4  # three checkpoints and the moving average
    for file in files:
        one = load_file(str(single / "data/finetune" / file))
        two = load_file(str(double / "data/finetune" / file))
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"{file} {key}: {m}")
        for name, mask in masks.items():
            assert bool((two[f"{name}.weight"][~mask] == 0).all()), f"{file} {name}"
    one = json.loads((single / "data/finetune/checkpoints.json").read_text())
    two = json.loads((double / "data/finetune/checkpoints.json").read_text())
    assert [c["step"] for c in two["checkpoints"]] == [3, 6, 9]
    for a, b in zip(one["checkpoints"], two["checkpoints"]):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)
    curve = json.loads((double / "plots/finetune_curve.json").read_text())
    reference = json.loads((single / "plots/finetune_curve.json").read_text())
    assert [p["train_loss"] for p in curve] == pytest.approx(
        [p["train_loss"] for p in reference], rel=1e-6)
    assert json.loads((double / "metrics/finetune.json").read_text())["processes"] == 2


def test_a_stage_that_is_not_data_parallel_refuses_torchrun(micro_upstream, session_tmp):
    import subprocess

    done = subprocess.run(TORCHRUN + ["-m", "tasks.masks"], cwd=micro_upstream,
                          env=run_env(session_tmp), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "stage masks does not run data-parallel" in done.stderr
