"""Sharded fine-tuning (finetune.sharding: fsdp): under `torchrun --nproc_per_node=2` on gloo
the finetune stage's checkpoints equal the unsharded single-process run's on the same global
batches, with every pruned weight exactly zero; a sharded run killed with SIGKILL resumes
bit-identical; in one process it stops before compute."""

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
    run(TORCHRUN + ["-m", "tasks.finetune"], sharded, env, timeout=300)
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


STEPS = 18
SHARDED_CHILD = f"""
import logging, sys, time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file, save_model

from gradprune.config import FinetuneParams, ModelParams
from gradprune.models.llama import build_llama, prunable_linears
from gradprune.training.loop import Distillation, MovingAverage, train_lm
from gradprune.training.parallel import (full_state_dict, init_process_group_from_env,
                                         is_main_process, shard_model)

init_process_group_from_env()
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
torch.set_num_threads(1)
out = Path(sys.argv[1])
# Tied embeddings: the gathered file names the pair as save_model names it unsharded.
tiny = ModelParams(layers=2, hidden=16, heads=2, kv_heads=1, ffn=32, tie_embeddings=True)
model = build_llama(tiny, 64, 16, 0, seed=0)
save_model(model, str(out / f"unsharded-{{torch.distributed.get_rank()}}.safetensors"))
unsharded = load_file(str(out / f"unsharded-{{torch.distributed.get_rank()}}.safetensors"))
teacher = build_llama(tiny, 64, 16, 0, seed=1)
g = torch.Generator().manual_seed(2)
masks = {{name: torch.rand(layer.weight.shape, generator=g) < 0.5
         for name, layer in prunable_linears(model, ("model.layers.*",)).items()}}
train_blocks = torch.randint(0, 64, (24, 16), generator=g)
val_blocks = torch.randint(0, 64, (4, 16), generator=g)
cfg = FinetuneParams(steps={STEPS}, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=3,
                     weight_decay=0.1, eval_every=3, eval_blocks=4, bf16="off")
shard_model(model)
shard_model(teacher)
gathered = full_state_dict(model)
if is_main_process():
    assert gathered.keys() == unsharded.keys(), (sorted(gathered), sorted(unsharded))
    assert all(torch.equal(gathered[k], unsharded[k]) for k in unsharded)
ema = MovingAverage(0.8)


def pause(step, val_loss):
    time.sleep(0.3)  # widens the window in which the test kills the run between saves


train_lm(model, train_blocks, val_blocks, cfg, seed=3, bf16=False, masks=masks,
         on_validation=pause, grad_accum=2, distillation=Distillation(teacher, 2.0, 0.5),
         ema=ema, state_dir=out / "state")
weights = full_state_dict(model)
averaged = {{k: v.full_tensor() for k, v in ema.weights.items()}}
if is_main_process():
    save_file({{**{{f"model.{{k}}": v for k, v in weights.items()}},
               **{{f"ema.{{k}}": v.contiguous() for k, v in averaged.items()}}}},
              str(out / "final.safetensors"))
torch.distributed.destroy_process_group()
"""


def _torchrun_child(folder, env, wait: bool = True):
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "child.py").write_text(SHARDED_CHILD)
    return subprocess.Popen(
        TORCHRUN + [str(folder / "child.py"), str(folder)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _descendants(pid: int) -> list[int]:
    from pathlib import Path

    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return [d for c in children for d in (c, *_descendants(c))]


@pytest.mark.integration
def test_a_sharded_run_killed_with_sigkill_resumes_bit_identical(tmp_path):
    """Each process saves its own shard of weights, AdamW moments and moving average; the whole
    launch killed between saves and launched again ends where an uninterrupted launch does."""
    import os
    import signal
    import time
    from pathlib import Path

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    whole = _torchrun_child(tmp_path / "whole", env)
    log = whole.communicate(timeout=300)[0]
    assert whole.returncode == 0, log[-3000:]

    killed = _torchrun_child(tmp_path / "killed", env)
    state = tmp_path / "killed" / "state"
    deadline = time.monotonic() + 240
    while not list(state.glob("step-*/state.json")) and killed.poll() is None:
        assert time.monotonic() < deadline, "no save within 240 s"
        time.sleep(0.02)
    # torchrun starts its workers in sessions of their own: kill them by id, then torchrun.
    for pid in [*_descendants(killed.pid), killed.pid]:
        os.kill(pid, signal.SIGKILL)
    killed.wait(timeout=60)
    assert not (tmp_path / "killed" / "final.safetensors").exists(), "the run ended before the kill"
    saves = sorted(state.glob("step-*/state.json"))
    assert saves and int(saves[-1].parent.name.split("-")[1]) < STEPS
    assert {p.name for p in saves[-1].parent.glob("shard-*")} == {
        "shard-0.safetensors",
        "shard-1.safetensors",
    }

    again = _torchrun_child(tmp_path / "killed", env)
    log = again.communicate(timeout=300)[0]
    assert again.returncode == 0, log[-3000:]
    assert "resuming from step" in log
    one = load_file(str(tmp_path / "whole" / "final.safetensors"))
    two = load_file(str(tmp_path / "killed" / "final.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), key
