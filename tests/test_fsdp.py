"""Sharded fine-tuning (finetune.sharding: fsdp): under `torchrun --nproc_per_node=2` on gloo
the finetune stage's checkpoints equal the unsharded single-process run's on the same global
batches, with every pruned weight exactly zero; in one process it stops before compute."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml
from conftest import copy_repo, micro_params, record_refusal, run, run_env
from safetensors.torch import load_file

from gradprune.config import ParamError, params_from_dict
from gradprune.training.parallel import check_sharding

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# fp32 (the upstream repo's finetune.bf16: off) sums of the same terms in another order.
RTOL, ATOL = 1e-5, 1e-7
FIX = "torchrun --standalone --nproc-per-node N -m tasks.finetune"


def test_fsdp_in_one_process_stops_before_compute(tmp_path, monkeypatch):
    """No torchrun (or WORLD_SIZE=1): the stage refuses before it reads a file, naming the key
    and both fixes."""
    import tasks.finetune

    monkeypatch.chdir(tmp_path)  # no data/ here: any read would fail otherwise
    monkeypatch.setenv("WORLD_SIZE", "1")
    params = params_from_dict({"finetune": {"sharding": "fsdp"}})
    with pytest.raises(ParamError) as err:
        tasks.finetune.run(params, stage=None)
    message = str(err.value)
    assert message.startswith(
        "params: finetune.sharding: fsdp shards the model over processes, but this is one process"
    )
    assert FIX in message and "finetune.sharding: none" in message
    record_refusal("finetune.sharding: fsdp in one process", message)
    check_sharding("none")  # unsharded fine-tuning runs in one process


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"finetune": {"sharding": "zero3"}}, "finetune.sharding"),
        ({"finetune": {"sharding": "fsdp", "loss_chunk": 64}}, "finetune.loss_chunk"),
        ({"finetune": {"sharding": "fsdp"}, "compare": {"finetune": True}}, "compare.finetune"),
        (
            {
                "finetune": {"sharding": "fsdp"},
                "model": {"arch": "seq2seq"},
                "gradients": {"include": ["encoder.layers.*"]},
            },
            "finetune.sharding",
        ),
    ],
)
def test_what_sharding_cannot_do_is_refused_by_the_params_check(changes, key):
    with pytest.raises(ParamError) as err:
        params_from_dict(changes)
    assert err.value.key == key
    if key == "finetune.sharding" and "zero3" in str(err.value):
        assert "none" in str(err.value) and "fsdp" in str(err.value)


@pytest.fixture(scope="module")
def repos(micro_upstream, session_tmp):
    """(single-process unsharded repo, two-process sharded repo), each after finetune from the
    same masks."""
    env = run_env(session_tmp)
    single = copy_repo(micro_upstream, session_tmp / "fsdp-single")
    sharded = copy_repo(micro_upstream, session_tmp / "fsdp-sharded")
    params = yaml.safe_load((sharded / "params.yaml").read_text())
    params["finetune"]["sharding"] = "fsdp"
    (sharded / "params.yaml").write_text(yaml.safe_dump(params))
    run([sys.executable, "-m", "tasks.finetune"], single, env, timeout=300)
    log = run(TORCHRUN + ["-m", "tasks.finetune"], sharded, env, timeout=300)
    assert "keeps no mid-run state to resume from" in log
    return single, sharded


@pytest.mark.integration
def test_sharded_checkpoints_equal_the_unsharded_ones_and_stay_pruned(repos):
    from gradprune.pruning.masks import load_masks

    single, sharded = repos
    # Distillation from the dense teacher (sharded too) and the moving average are on.
    assert micro_params()["finetune"]["distill_weight"] > 0
    masks = load_masks(single / "data/masks/masks.safetensors")
    files = sorted(p.name for p in (single / "data/finetune").glob("*.safetensors"))
    assert files == sorted(p.name for p in (sharded / "data/finetune").glob("*.safetensors"))
    assert len(files) == 4  # three checkpoints and the moving average
    for file in files:
        one = load_file(str(single / "data/finetune" / file))
        two = load_file(str(sharded / "data/finetune" / file))
        assert two.keys() == one.keys(), file
        for key in one:
            torch.testing.assert_close(
                two[key],
                one[key],
                rtol=RTOL,
                atol=ATOL,
                msg=lambda m, where=f"{file} {key}": f"{where}: {m}",
            )
        for name, mask in masks.items():
            assert bool((two[f"{name}.weight"][~mask] == 0).all()), f"{file} {name}"
            assert int((two[f"{name}.weight"][mask] == 0).sum()) == 0, f"{file} {name} trained"
    one = json.loads((single / "data/finetune/checkpoints.json").read_text())
    two = json.loads((sharded / "data/finetune/checkpoints.json").read_text())
    assert [c["step"] for c in two["checkpoints"]] == [3, 6, 9]
    for a, b in zip(one["checkpoints"] + one["ema"], two["checkpoints"] + two["ema"]):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)
    assert json.loads((sharded / "metrics/finetune.json").read_text())["processes"] == 2
    assert json.loads((sharded / "reports/finetune.json").read_text())["sharding"] == "fsdp"
    assert not (sharded / "data/.finetune-resume").exists()


@pytest.mark.integration
def test_the_average_stage_merges_sharded_checkpoints(repos, session_tmp):
    from gradprune.pruning.masks import load_masks

    _, sharded = repos
    run([sys.executable, "-m", "tasks.average"], sharded, run_env(session_tmp), timeout=300)
    merged = load_file(str(sharded / "data/average/model/model.safetensors"))
    for name, mask in load_masks(sharded / "data/masks/masks.safetensors").items():
        assert bool((merged[f"{name}.weight"][~mask] == 0).all()), name
