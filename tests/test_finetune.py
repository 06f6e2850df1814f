"""Masked fine-tuning and merging: distillation, accumulation, early stopping, divergence,
the averaging methods, and the finetune and average stages on a tiny workspace."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
from conftest import params_over_defaults
from safetensors.torch import load_file, save_file

from gradprune.config import FinetuneParams, ModelParams, params_from_dict
from gradprune.device import resolve_device
from gradprune.io import read_json
from gradprune.models.llama import build_llama, prunable_linears
from gradprune.pruning.masks import save_masks
from gradprune.training.averaging import greedy_soup, merge, swa_weights
from gradprune.training.loop import (
    Distillation,
    MovingAverage,
    adamw,
    batch_order,
    distillation_loss,
    load_train_state,
    train_lm,
)

VOCAB, CONTEXT = 64, 16
TINY = ModelParams(layers=1, hidden=16, heads=2, kv_heads=1, ffn=32)
CFG = FinetuneParams(steps=6, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=2,
                     weight_decay=0.1, eval_every=3, eval_blocks=4, bf16="off")


def _model(seed: int = 0, vocab: int = VOCAB):
    return build_llama(TINY, vocab_size=vocab, context=CONTEXT, eos_token_id=0, seed=seed)


def _blocks(n: int, seed: int, high: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n, CONTEXT), generator=g)


def _random_masks(model, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(layer.weight.shape, generator=g) < 0.5
            for name, layer in prunable_linears(model, ("model.layers.*",)).items()}


# --- distillation: a known answer ---------------------------------------------------------

def test_distillation_loss_known_answer():
    # One position, two classes. Teacher logits (ln 3, 0), student (0, 0).
    teacher = torch.tensor([[[math.log(3.0), 0.0]]])
    student = torch.zeros(1, 1, 2)
    # T = 1: p_t = (3/4, 1/4), p_s = (1/2, 1/2); KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    kl_t1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kl_t1 == pytest.approx(0.1308120)
    assert distillation_loss(student, teacher, 1.0).item() == pytest.approx(kl_t1, rel=1e-6)
    # T = 2: p_t = (sqrt3, 1) / (sqrt3 + 1); KL scaled by T^2 = 4
    s3 = math.sqrt(3.0)
    p = (s3 / (s3 + 1), 1 / (s3 + 1))
    kl_t2 = p[0] * math.log(2 * p[0]) + p[1] * math.log(2 * p[1])
    assert 4 * kl_t2 == pytest.approx(0.1453631, rel=1e-6)
    assert distillation_loss(student, teacher, 2.0).item() == pytest.approx(4 * kl_t2, rel=1e-6)


def test_distillation_loss_averages_positions_and_mixes_with_lm_loss():
    # Two positions: the one above, and one where student and teacher agree (KL 0).
    teacher = torch.tensor([[[math.log(3.0), 0.0], [1.0, -1.0]]])
    student = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])  # same softmax as (1, -1)
    kl = (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2
    kd = distillation_loss(student, teacher, 1.0)
    assert kd.item() == pytest.approx(kl, rel=1e-6)
    mix = Distillation(teacher=None, temperature=1.0, weight=0.25).mix(torch.tensor(2.0), kd)
    assert mix.item() == pytest.approx(0.75 * 2.0 + 0.25 * kl, rel=1e-6)
    assert distillation_loss(teacher, teacher, 3.0).item() == pytest.approx(0.0, abs=1e-7)


# --- the fine-tuning loop ----------------------------------------------------------------

def test_finetuning_with_every_feature_keeps_zeros_in_weights_and_moving_average():
    model, teacher = _model(seed=1), _model(seed=2)
    masks = _random_masks(model, seed=3)
    ema = MovingAverage(0.8)
    curve = train_lm(model, _blocks(16, 0), _blocks(4, 1), CFG, seed=0, bf16=True, masks=masks,
                     grad_accum=2, distillation=Distillation(teacher, 2.0, 0.5), ema=ema)
    assert [p.step for p in curve] == list(range(1, 7))
    assert all(p.kd_loss is not None and p.kd_loss > 0 for p in curve)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert (params[f"{name}.weight"][~mask] == 0).all(), name
        assert (ema.weights[f"{name}.weight"][~mask] == 0).all(), name
        assert (ema.weights[f"{name}.weight"][mask] != 0).all(), name
    # the moving average lags the weights
    assert not torch.equal(ema.weights["lm_head.weight"], params["lm_head.weight"])


def test_gradient_accumulation_matches_one_big_batch():
    # batch_order draws the same block sequence for 2 x 2 and 1 x 4 blocks per step.
    states = []
    for batch_size, accum in ((4, 1), (2, 2)):
        model = _model(seed=4)
        cfg = dataclasses.replace(CFG, batch_size=batch_size)
        train_lm(model, _blocks(12, 0), _blocks(4, 1), cfg, seed=5, bf16=False, grad_accum=accum)
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.allclose(states[0][key], states[1][key], rtol=1e-4, atol=1e-5), key


def test_early_stopping_after_patience_validations_without_improvement():
    model = _model()
    # lr 0: the validation loss never moves, so it never improves after the first validation.
    cfg = dataclasses.replace(CFG, steps=20, lr=0.0, min_lr=0.0, eval_every=2)
    curve = train_lm(model, _blocks(8, 0), _blocks(4, 1), cfg, seed=0, bf16=False, patience=2)
    assert [p.step for p in curve] == [1, 2, 3, 4, 5, 6]
    assert [p.step for p in curve if p.val_loss is not None] == [2, 4, 6]


def test_nan_loss_names_step_and_blocks_and_keeps_last_good_state(tmp_path):
    model = _model(seed=6)
    with torch.no_grad():  # a poisoned token: any block holding it gives a NaN loss
        model.model.embed_tokens.weight[VOCAB - 1] = float("nan")
    cfg = dataclasses.replace(CFG, steps=8, batch_size=2, eval_every=1)
    order = batch_order(8, 2, 8, seed=9).tolist()
    # poison the block whose first batch comes last
    first_step = {block: next(s for s, batch in enumerate(order) if block in batch)
                  for block in range(8)}
    poisoned = max(first_step, key=first_step.get)
    bad_step = first_step[poisoned] + 1
    assert bad_step > 1
    train_blocks = _blocks(8, 0, high=VOCAB - 1)
    train_blocks[poisoned, 3] = VOCAB - 1
    with pytest.raises(FloatingPointError) as info:
        train_lm(model, train_blocks, _blocks(2, 1, high=VOCAB - 1), cfg, seed=9, bf16=False,
                 state_dir=tmp_path / "state")
    message = str(info.value)
    assert f"loss is nan at step {bad_step}, batch of blocks {order[bad_step - 1]}" in message
    assert f"the last good state (step-{bad_step - 1:06d}) is kept in {tmp_path / 'state'}" \
        in message
    fresh = _model(seed=6)
    progress = load_train_state(tmp_path / "state", fresh, adamw(fresh, cfg), None)
    assert progress.step == bad_step - 1
    assert [p.step for p in progress.curve] == list(range(1, bad_step))


# --- merging ------------------------------------------------------------------------------

def _write(tmp_path, name, tensors):
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def test_greedy_soup_picks_the_right_set(tmp_path):
    # val_loss_of(state) = |w - (0, 0)|^2; recorded losses are those of each checkpoint alone.
    points = {"a": [1.0, 0.0], "b": [-1.0, 0.5], "c": [3.0, 3.0], "d": [0.0, -1.2],
              "e": [0.5, 3.0]}
    paths = [_write(tmp_path, f"{k}.safetensors", {"w": torch.tensor(v, dtype=torch.float64)})
             for k, v in points.items()]
    losses = [sum(x * x for x in v) for v in points.values()]  # a 1, b 1.25, c 18, d 1.44, e 9.25

    def val_loss_of(state):
        return float(state["w"].square().sum())

    # Order a, b, d, e, c. {a}: 1. +b: mean (0, .25) -> .0625, kept. +d: mean (0, -.2333)
    # -> .0544, kept. +e: mean (.125, .575) -> .346, left out. +c: (.75, .575) -> .89, left out.
    weights, soup_loss = greedy_soup(paths, losses, {}, val_loss_of)
    assert weights == pytest.approx([1 / 3, 1 / 3, 0, 1 / 3, 0])
    assert soup_loss == pytest.approx((0.7 / 3) ** 2)
    # A checkpoint that makes the soup worse is never added, even when it is second best.
    weights, soup_loss = greedy_soup(paths[:1] + paths[2:3], [1.0, 18.0], {}, val_loss_of)
    assert weights == [1.0, 0.0] and soup_loss == 1.0


def test_swa_takes_the_tail_of_each_run():
    # runs of 12 and 8 steps, fraction 0.5: steps > 6 of the first, > 4 of the second
    assert swa_weights([3, 6, 9, 12, 4, 8], [12, 12, 12, 12, 8, 8], 0.5) == \
        pytest.approx([0, 0, 1 / 3, 1 / 3, 0, 1 / 3])
    assert swa_weights([3, 6], [6, 6], 0.01) == [0.0, 1.0]  # the last checkpoint always counts


def test_no_merge_revives_a_pruned_weight(tmp_path):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(8, 6, generator=g) < 0.5
    masks = {"layer": mask}
    states = [{"layer.weight": torch.randn(8, 6, generator=g) * mask} for _ in range(3)]
    # one checkpoint drifted where it was pruned (a bug elsewhere must not leak through)
    states[1]["layer.weight"][~mask] = 1.0
    paths = [_write(tmp_path, f"c{i}.safetensors", s) for i, s in enumerate(states)]
    for weights in ([1 / 3] * 3, [0.2, 0.5, 0.3], [0.0, 1.0, 0.0]):
        merged = merge(paths, weights, masks)["layer.weight"]
        assert (merged[~mask] == 0).all()
        assert (merged[mask] != 0).all()
    seen = []
    greedy_soup(paths, [1.0, 2.0, 3.0], masks,
                lambda s: seen.append(s["layer.weight"].clone()) or 0.5)
    assert len(seen) == 2 and all((w[~mask] == 0).all() for w in seen)


# --- the finetune and average stages on a tiny workspace -----------------------------------

class FakeStage:
    """What a stage needs of tasks.stage.Stage, without MLflow."""

    def __init__(self, params):
        self.params = params
        self.device = resolve_device(params.device)
        self.plots = {}

    def write_plot(self, name, rows):
        self.plots[name] = rows

    def log_artifact(self, path, artifact_path=None):
        pass

    def log_curve(self, rows, prefix="", series=None):
        pass

    def register_model(self, folder, artifact_path="model", **metadata):
        return 1

    def source_tags(self):
        return {}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    from gradprune.data import train_bpe_tokenizer, write_blocks
    from gradprune.io import write_json
    from gradprune.pruning.masks import sparsity_report

    monkeypatch.chdir(tmp_path)
    docs = [f"document {i} says the quick brown fox jumps over {i % 7} lazy dogs" * 3
            for i in range(40)]
    tokenizer = train_bpe_tokenizer(docs, 300)
    model = build_llama(TINY, len(tokenizer), CONTEXT, tokenizer.eos_token_id, seed=0)
    (tmp_path / "data" / "prepare").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir(parents=True)
    model.save_pretrained(tmp_path / "data" / "train" / "model")
    tokenizer.save_pretrained(tmp_path / "data" / "train" / "model")
    masks = _random_masks(model, 1)
    save_masks(tmp_path / "data" / "masks" / "masks.safetensors", masks)
    # the masks stage's report, which the average stage's model card reads
    write_json(tmp_path / "data" / "masks" / "masks.json", sparsity_report(masks))
    write_blocks(tmp_path / "data" / "prepare" / "train.parquet", _blocks(24, 2, len(tokenizer)))
    write_blocks(tmp_path / "data" / "prepare" / "val.parquet", _blocks(6, 3, len(tokenizer)))
    return tmp_path


def _params(**average):
    return params_from_dict(params_over_defaults({
        "finetune": {"steps": 6, "batch_size": 4, "warmup_steps": 1, "eval_every": 2,
                     "eval_blocks": 4, "checkpoints": 3, "runs": 2, "distill_weight": 0.5,
                     "bf16": "off"},
        "average": average}))


def test_finetune_and_every_average_method_keep_the_mask(workspace, caplog):
    from gradprune.pruning.masks import load_masks
    from tasks import average, finetune

    params = _params()
    with caplog.at_level(logging.INFO, logger="gradprune"):
        metrics = finetune.run(params, FakeStage(params))
    assert metrics["runs"] == 2 and metrics["checkpoints"] == 6
    assert not (workspace / "data" / ".finetune-resume").exists()
    record = read_json(workspace / "data" / "finetune" / "checkpoints.json")
    assert [(c["run"], c["step"]) for c in record["checkpoints"]] == \
        [(0, 2), (0, 4), (0, 6), (1, 2), (1, 4), (1, 6)]
    assert [r["seed"] for r in record["runs"]] == [1236, 1237]
    assert [e["file"] for e in record["ema"]] == ["ema-r0.safetensors", "ema-r1.safetensors"]
    masks = load_masks(workspace / "data" / "masks" / "masks.safetensors")

    def assert_masked(state):
        for name, mask in masks.items():
            assert (state[f"{name}.weight"][~mask] == 0).all(), name
            assert (state[f"{name}.weight"][mask] != 0).float().mean() > 0.99, name

    for entry in record["checkpoints"] + record["ema"]:
        assert_masked(load_file(str(workspace / "data" / "finetune" / entry["file"])))
    # runs differ in data order, so their weights differ
    first, second = (load_file(str(workspace / "data" / "finetune" / f"ckpt-r{r}-000006"
                                             ".safetensors")) for r in (0, 1))
    assert not torch.equal(first["lm_head.weight"], second["lm_head.weight"])

    for method in ("uniform", "val_weighted", "greedy", "ema", "swa"):
        params = _params(method=method)
        metrics = average.run(params, FakeStage(params))
        report = read_json(workspace / "data" / "average" / "weights.json")
        assert report["method"] == method
        assert sum(c["weight"] for c in report["checkpoints"]) == pytest.approx(1.0)
        assert metrics["merged_val_loss"] == report["merged_val_loss"]
        assert report["best_checkpoint_val_loss"] == \
            min(c["val_loss"] for c in record["checkpoints"])
        assert_masked(load_file(str(workspace / "data" / "average" / "model"
                                    / "model.safetensors")))
        if method == "greedy":  # starts from the best checkpoint, so never worse on validation
            assert report["merged_val_loss"] <= report["best_checkpoint_val_loss"]
        if method == "swa":  # steps 4 and 6 of each run
            assert [c["weight"] for c in report["checkpoints"]] == [0, 0.25, 0.25, 0, 0.25, 0.25]
        if method == "ema":
            assert [c["file"] for c in report["checkpoints"]] == \
                ["ema-r0.safetensors", "ema-r1.safetensors"]


def test_finetune_starts_over_when_params_changed(workspace, caplog):
    from tasks import finetune

    resume = workspace / "data" / ".finetune-resume"
    resume.mkdir(parents=True)
    (resume / "fingerprint.json").write_text('{"fingerprint": "other"}')
    (resume / "run-0").mkdir()
    (resume / "run-0" / "run.json").write_text('{"stale": true}')
    params = _params()
    with caplog.at_level(logging.INFO, logger="gradprune"):
        finetune.run(params, FakeStage(params))
    assert "holds state from other params or inputs; starting over" in caplog.text
    assert len(read_json(workspace / "data" / "finetune" / "checkpoints.json")["runs"]) == 2


@pytest.mark.parametrize("tied", [False, True])
def test_a_saved_checkpoint_loads_back_with_or_without_tied_embeddings(tmp_path, tied):
    """safetensors stores a tied pair (SmolLM2's lm_head / embed_tokens) under one name; the
    average stage must accept the other name missing, and nothing else."""
    from safetensors.torch import save_model

    from gradprune.models.llama import build_llama
    from tasks.recovery import load_state

    cfg = ModelParams(layers=1, hidden=16, heads=2, kv_heads=1, ffn=32, tie_embeddings=tied)
    model = build_llama(cfg, vocab_size=50, context=16, eos_token_id=0, seed=0)
    save_model(model, str(tmp_path / "ckpt.safetensors"))
    state = load_file(str(tmp_path / "ckpt.safetensors"))
    assert ("model.embed_tokens.weight" in state) != tied
    other = build_llama(cfg, vocab_size=50, context=16, eos_token_id=0, seed=1)
    load_state(other, state)
    torch.testing.assert_close(other.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    del state["model.norm.weight"]
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_state(other, state)
