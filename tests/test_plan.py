"""gradprune plan: built on the meta device from a config.json, known counts for Llama-2-7B,
parts that follow the chosen modes, and a stage that cannot fit stopped with a message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradprune.config import params_from_dict
from gradprune.plan import (
    RUNTIME_HOST_BYTES,
    check_fits,
    model_shapes,
    plan_stages,
    read_llama_config,
)

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_7B = ROOT / "presets" / "llama2-7b-config.json"
GIB = 2**30


def test_llama2_7b_on_the_meta_device_has_its_published_size():
    shapes = model_shapes(read_llama_config(LLAMA2_7B), params_from_dict({}))
    assert shapes.parameters == 6_738_415_616          # Llama-2-7b's parameter count
    # 32 layers x (4 attention 4096^2 + 3 MLP 4096 x 11008) prunable weights
    assert shapes.prunable == 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008) == 6_476_005_376
    assert shapes.largest_prunable == 4096 * 11008
    assert shapes.prunable_inputs_sq == 32 * (6 * 4096 ** 2 + 11008 ** 2)


def test_gradient_pass_parts_follow_the_modes():
    config = read_llama_config(LLAMA2_7B)
    s = model_shapes(config, params_from_dict({}))
    lean = plan_stages(config, params_from_dict({"compare": {"criteria": ["gradient"]}}))
    g = lean["gradients"]
    assert g.device["accumulators"] == 4 * s.prunable          # E[g] only
    assert g.device["one_gradient"] == 4 * 4096 * 11008
    assert g.device["weights"] == 4 * 6_738_415_616
    offloaded = plan_stages(config, params_from_dict({
        "compare": {"criteria": ["gradient"]},
        "gradients": {"offload": True, "checkpointing": True}}))["gradients"]
    assert "accumulators" not in offloaded.device
    assert offloaded.host == {"runtime": RUNTIME_HOST_BYTES, "accumulators": 4 * s.prunable}
    # checkpointed: 4H per token and layer plus one layer's activations, a 256-token block
    tokens = 256
    assert offloaded.device["activations"] == 32 * 4 * 4096 * tokens + \
        (22 * 4096 + 8 * 11008) * tokens
    everything = plan_stages(config, params_from_dict({"gradients": {"statistics": "all"}}))
    assert everything["gradients"].disk["statistics"] == \
        3 * 4 * s.prunable + 4 * s.prunable_inputs + 4 * s.prunable_inputs_sq


def test_finetune_counts_weights_gradients_adamw_and_average():
    config = read_llama_config(LLAMA2_7B)
    f = plan_stages(config, params_from_dict({}))["finetune"].device
    n = 6_738_415_616
    assert (f["weights"], f["gradients"], f["adamw_moments"], f["moving_average"]) == \
        (4 * n, 4 * n, 8 * n, 4 * n)
    assert f["logits"] == 16 * 32000 * 16 * 256     # batch 16 x 256 tokens over the vocabulary


def test_a_stage_that_cannot_fit_stops_with_the_knobs_to_turn():
    need = plan_stages(read_llama_config(LLAMA2_7B), params_from_dict({}))["finetune"]
    with pytest.raises(ValueError) as err:
        check_fits("finetune", need, torch.device("cuda", 0), available=80 * GIB)
    message = str(err.value)
    assert message.startswith("stage finetune: the plan needs 167.6 GiB of device memory but "
                              "cuda:0 has 80.0 GiB (largest parts: adamw_moments 50.2 GiB")
    assert "gradients.checkpointing: true" in message and "`gradprune plan`" in message
    check_fits("evaluate", plan_stages(read_llama_config(LLAMA2_7B), params_from_dict({}))
               ["evaluate"], torch.device("cuda", 0), available=80 * GIB)


def test_a_config_of_another_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="model_type 'gpt2'; plan knows LLaMA models"):
        read_llama_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_llama_config(tmp_path / "missing.json")


def test_the_plan_command_prints_every_stage_and_fails_when_one_does_not_fit(capsys):
    from flows.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--config", str(LLAMA2_7B), "--params", str(ROOT / "params.yaml")])
    out = capsys.readouterr().out
    assert exit_.value.code == 1
    for stage in ("train", "gradients", "masks", "finetune", "average", "evaluate"):
        assert f"\n{stage} " in out
    assert "finetune         167.6" in out


def test_sharded_finetune_divides_the_training_state_over_the_processes(capsys):
    """finetune.sharding: fsdp over 4 processes: a quarter of the weights, gradients, moments
    and moving average each, two gathered decoder layers and the gathered root, a quarter of
    each batch; a 7B masked fine-tune that needs 167.6 GiB on one GPU fits 80 GiB each."""
    from flows.cli import main

    config = read_llama_config(LLAMA2_7B)
    n = 6_738_415_616
    layer = 4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096     # attention, MLP, two RMSNorms
    root = 2 * 32000 * 4096 + 4096                           # embeddings, LM head, final norm
    assert n == 32 * layer + root
    sharded = params_from_dict({"finetune": {"sharding": "fsdp"}})
    f = plan_stages(config, sharded, processes=4)["finetune"]
    assert (f.device["weights"], f.device["gradients"], f.device["adamw_moments"],
            f.device["moving_average"]) == (n, n, 2 * n, n)
    assert f.device["gathered_layers"] == 2 * 8 * layer
    assert f.device["gathered_root"] == 8 * root
    assert f.device["logits"] == 16 * 32000 * 4 * 256        # 16 blocks over 4 processes
    assert f.device["masks"] == 6_476_005_376                # every process holds them whole
    assert f.host["gathered_checkpoint"] == 4 * n            # rank 0 writes the whole model
    assert f.disk["resume_state"] == 16 * n                  # every process's shard, in all
    check_fits("finetune", f, torch.device("cuda", 0), available=80 * GIB)
    # Data parallel without sharding splits the batch only: every process holds everything.
    replicated = plan_stages(config, params_from_dict({}), processes=4)["finetune"]
    assert replicated.device["weights"] == 4 * n and "gathered_layers" not in replicated.device
    with pytest.raises(ValueError, match="finetune.sharding: fsdp"):
        check_fits("finetune", replicated, torch.device("cuda", 0), available=80 * GIB)

    with pytest.raises(SystemExit):
        main(["plan", "--config", str(LLAMA2_7B), "--params", str(ROOT / "params.yaml"),
              "--set", "finetune.sharding=fsdp", "--processes", "4"])
    out = capsys.readouterr().out
    assert "(80 GiB GPU, 4 processes)" in out
    finetune_row = next(line for line in out.splitlines() if line.startswith("finetune "))
    assert finetune_row.split()[1:4] == ["60.6", "25.7", "351.4"] and "yes" in finetune_row
