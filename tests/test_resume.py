"""Resuming fine-tuning: a run killed with SIGKILL and rerun ends bit-identical to one never
interrupted; so does a finetune stage interrupted between and inside its runs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_finetune import FakeStage, _params, workspace  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 18

CHILD = f"""
import json, logging, sys, time
from pathlib import Path

import torch
from safetensors.torch import save_file

from gradprune.config import FinetuneParams, ModelParams
from gradprune.models.llama import build_llama, prunable_linears
from gradprune.training.loop import Distillation, MovingAverage, train_lm

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
torch.set_num_threads(1)
out = Path(sys.argv[1])
tiny = ModelParams(layers=1, hidden=16, heads=2, kv_heads=1, ffn=32)
model = build_llama(tiny, 64, 16, 0, seed=0)
teacher = build_llama(tiny, 64, 16, 0, seed=1)
g = torch.Generator().manual_seed(2)
masks = {{name: torch.rand(layer.weight.shape, generator=g) < 0.5
         for name, layer in prunable_linears(model, ("model.layers.*",)).items()}}
train_blocks = torch.randint(0, 64, (24, 16), generator=g)
val_blocks = torch.randint(0, 64, (4, 16), generator=g)
cfg = FinetuneParams(steps={STEPS}, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=3,
                     weight_decay=0.1, eval_every=3, eval_blocks=4, bf16="off")
ema = MovingAverage(0.8)


def pause(step, val_loss):
    time.sleep(0.1)  # widens the window in which the test kills the run between saves


curve = train_lm(model, train_blocks, val_blocks, cfg, seed=3, bf16=False, masks=masks,
                 on_validation=pause, grad_accum=2, patience=50,
                 distillation=Distillation(teacher, 2.0, 0.5), ema=ema,
                 state_dir=out / "state")
tensors = {{f"model.{{k}}": v.contiguous() for k, v in model.state_dict().items()}}
tensors.update({{f"ema.{{k}}": v for k, v in ema.weights.items()}})
save_file(tensors, str(out / "final.safetensors"))
(out / "curve.json").write_text(json.dumps([vars(p) for p in curve]))
"""


def _start(script: Path, out: Path) -> subprocess.Popen:
    out.mkdir(exist_ok=True)  # a rerun goes into the killed run's folder
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(script), str(out)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(child: subprocess.Popen) -> str:
    _, err = child.communicate(timeout=120)
    assert child.returncode == 0, err[-3000:]
    return err


@pytest.mark.integration
def test_sigkilled_run_resumes_bit_identical(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    # Both at once: the uninterrupted run and the one to be killed.
    whole = _start(script, tmp_path / "whole")
    killed = _start(script, tmp_path / "killed")
    state = tmp_path / "killed" / "state"
    deadline = time.monotonic() + 90
    while not any(state.glob("step-*")):
        assert killed.poll() is None, killed.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no resumable state was written"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final.safetensors").exists()
    _finish(whole)

    log = _finish(_start(script, tmp_path / "killed"))
    resumed_from = int(log.split("resuming from step ")[1].split()[0])
    assert 3 <= resumed_from < STEPS

    a = load_file(str(tmp_path / "whole" / "final.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (tmp_path / "whole" / "curve.json").read_text() == \
        (tmp_path / "killed" / "curve.json").read_text()
    assert len(json.loads((tmp_path / "whole" / "curve.json").read_text())) == STEPS


def test_finetune_stage_interrupted_in_its_second_run_resumes_bit_identical(
        workspace, monkeypatch, caplog):  # noqa: F811
    from tasks import finetune, recovery

    params = _params()
    finetune.run(params, FakeStage(params))
    out = workspace / "data" / "finetune"
    expected = {p.name: p.read_bytes() for p in out.iterdir()}
    shutil.rmtree(out)  # as DVC does before rerunning a stage

    save_weights = recovery.save_weights

    def crash_in_run_1(model, path):
        if path.name == "ckpt-r1-000004.safetensors":
            raise KeyboardInterrupt("interrupted")
        save_weights(model, path)

    monkeypatch.setattr(recovery, "save_weights", crash_in_run_1)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(params, FakeStage(params))
    resume = workspace / "data" / ".finetune-resume"
    assert (resume / "run-0" / "run.json").is_file()
    assert [p.name for p in (resume / "run-1" / "state").iterdir()] == ["step-000002"]
    monkeypatch.setattr(recovery, "save_weights", save_weights)

    with caplog.at_level(logging.INFO, logger="gradprune"):
        finetune.run(params, FakeStage(params))
    assert "holds state from these params and inputs; resuming" in caplog.text
    assert "resuming from step 2" in caplog.text
    assert {p.name: p.read_bytes() for p in out.iterdir()} == expected
    assert not resume.exists()
