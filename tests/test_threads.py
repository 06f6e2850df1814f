"""Thread-count independence of the statistics whose ranking decides masks: the gradients and
masks stages of the micro DAG, with bf16 autocast as the default run has it, give the same
bytes with 1 and with 2 torch threads."""

from __future__ import annotations

import sys

import pytest
import yaml
from conftest import copy_repo, run, run_env


@pytest.mark.integration
def test_gradients_and_masks_do_not_depend_on_the_thread_count(micro_upstream, session_tmp):
    outputs = {}
    for threads in (1, 2):
        repo = copy_repo(micro_upstream, session_tmp / f"threads-{threads}")
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["gradients"]["bf16"] = "on"  # the default run's bf16 reductions
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
        env = {**run_env(session_tmp), "OMP_NUM_THREADS": str(threads),
               "MKL_NUM_THREADS": str(threads)}
        for stage in ("gradients", "masks"):
            run([sys.executable, "-m", f"tasks.{stage}"], repo, env, timeout=600)
        outputs[threads] = {
            "stats": (repo / "data/gradients/stats.safetensors").read_bytes(),
            "masks": (repo / "data/masks/masks.safetensors").read_bytes()}
    assert outputs[1]["masks"] == outputs[2]["masks"]
    assert outputs[1]["stats"] == outputs[2]["stats"]
