"""The lean gradient pass: the statistics of a full backward-then-fold pass, to float tolerance,
while holding one prunable gradient at a time and only the accumulators asked for."""

from __future__ import annotations

import pytest
import torch

from gradprune.config import MaskParams, ModelParams, params_from_dict
from gradprune.models.llama import build_llama, prunable_linears
from gradprune.pruning.criteria import statistics_for
from gradprune.pruning.prune import prune
from gradprune.pruning.stats import (
    STATISTICS,
    collect_gradient_stats,
    load_stats,
    requested_statistics,
    save_stats,
)

TINY = ModelParams(layers=2, hidden=32, heads=4, kv_heads=2, ffn=64)
VOCAB, CONTEXT = 64, 16


def _model(seed: int = 0):
    return build_llama(TINY, vocab_size=VOCAB, context=CONTEXT, eos_token_id=0, seed=seed)


def _blocks(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, CONTEXT), generator=torch.Generator().manual_seed(seed))


def full_backward_stats(model, linears, blocks):
    """The pass as it was before: every prunable gradient alive after each backward, folded
    into all five statistics afterwards (fp32, one block per backward)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in linears.values():
        layer.weight.requires_grad_(True)
    sums = {n: {k: torch.zeros_like(m.weight) for k in STATISTICS[:3]} for n, m in linears.items()}
    act = {n: torch.zeros(m.in_features) for n, m in linears.items()}
    xtx = {n: torch.zeros(m.in_features, m.in_features) for n, m in linears.items()}
    tokens = dict.fromkeys(linears, 0)

    def record(name):
        def hook(module, inputs):
            x = inputs[0].detach().reshape(-1, module.in_features)
            act[name] += x.square().sum(0)
            xtx[name].addmm_(x.T, x)
            tokens[name] += len(x)
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in linears.items()]
    model.eval()
    alive = 0
    for block in blocks:
        batch = block.unsqueeze(0)
        model(input_ids=batch, labels=batch).loss.backward()
        alive = max(alive, sum(m.weight.grad is not None for m in linears.values()))
        for name, m in linears.items():
            g = m.weight.grad
            sums[name]["grad_mean"] += g
            sums[name]["grad_abs_mean"] += g.abs()
            sums[name]["grad_sq_mean"] += g.square()
            m.weight.grad = None
    for h in hooks:
        h.remove()
    for p in model.parameters():
        p.requires_grad_(True)
    stats = {n: {k: v / len(blocks) for k, v in per.items()} for n, per in sums.items()}
    for n in stats:
        stats[n]["act_norm"] = act[n].sqrt()
        stats[n]["hessian"] = xtx[n] / tokens[n]
    return stats, alive


def _close(got, want):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].keys() == want[name].keys(), name
        for k in want[name]:
            torch.testing.assert_close(got[name][k], want[name][k], rtol=1e-6, atol=1e-9,
                                       msg=lambda m: f"{name}.{k}: {m}")


def test_lean_pass_equals_the_full_backward_pass_with_one_gradient_alive():
    blocks = _blocks(3, 1)
    reference = _model(seed=4)
    want, alive_before = full_backward_stats(
        reference, prunable_linears(reference, ("model.layers.*",)), blocks)

    model = _model(seed=4)
    linears = prunable_linears(model, ("model.layers.*",))
    alive_now = []

    def count_alive(_):
        alive_now.append(sum(m.weight.grad is not None for m in linears.values()))

    # Registered first, so it runs before the pass's own hook has folded and freed the gradient.
    watchers = [m.weight.register_post_accumulate_grad_hook(count_alive)
                for m in linears.values()]
    got, _ = collect_gradient_stats(model, linears, blocks, bf16=False, statistics=STATISTICS)
    for w in watchers:
        w.remove()

    _close(got, want)
    assert alive_before == len(linears) == 14
    assert len(alive_now) == 3 * 14 and max(alive_now) == 1
    assert all(m.weight.grad is None for m in linears.values())


def test_only_the_requested_accumulators_exist():
    model = _model(seed=2)
    linears = prunable_linears(model, ("model.layers.*",))
    blocks = _blocks(2, 3)
    full, _ = collect_gradient_stats(model, linears, blocks, bf16=False, statistics=STATISTICS)
    one, _ = collect_gradient_stats(model, linears, blocks, bf16=False, statistics=["grad_sq_mean"])
    assert all(per.keys() == {"grad_sq_mean"} for per in one.values())
    for name in linears:
        assert torch.equal(one[name]["grad_sq_mean"], full[name]["grad_sq_mean"])


def test_activation_statistics_alone_need_no_backward():
    model = _model(seed=2)
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    linears = prunable_linears(model, ("model.layers.*",))
    blocks = _blocks(2, 3)
    full, loss_full = collect_gradient_stats(model, linears, blocks, bf16=False,
                                             statistics=STATISTICS)
    acts, loss = collect_gradient_stats(model, linears, blocks, bf16=False,
                                        statistics=["hessian", "act_norm"])
    assert loss == loss_full
    for name in linears:
        assert acts[name].keys() == {"act_norm", "hessian"}
        assert torch.equal(acts[name]["act_norm"], full[name]["act_norm"])
        assert torch.equal(acts[name]["hessian"], full[name]["hessian"])
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("options", [{"checkpointing": True}, {"offload": True},
                                     {"checkpointing": True, "offload": True}])
def test_checkpointing_and_offload_give_the_same_statistics(options):
    blocks = _blocks(3, 5)
    model = _model(seed=6)
    linears = prunable_linears(model, ("model.layers.*",))
    plain, loss = collect_gradient_stats(model, linears, blocks, bf16=False, statistics=STATISTICS)
    other, other_loss = collect_gradient_stats(model, linears, blocks, bf16=False,
                                               statistics=STATISTICS, **options)
    # Checkpointing reruns each layer's forward in backward: the input recorders must count
    # every token once, or act_norm and the hessian would be off by sqrt(2) and 2x.
    _close(other, plain)
    assert other_loss == pytest.approx(loss, rel=1e-6)
    # The layers' own forward is back afterwards.
    assert all("forward" not in vars(layer) for layer in model.model.layers)


@pytest.mark.parametrize("bf16", [False, True])
def test_linears_reading_one_input_share_its_statistics_with_the_same_bits(bf16, monkeypatch):
    """q/k/v and gate/up read one tensor: its activation statistics are taken once (4 X^T X
    products per layer and block, not 7). Handing k, v and up a copy of their input (a pre-hook
    registered before the pass's own) makes every Linear take its own, and must not change a
    bit."""
    blocks = _blocks(3, 7)
    shared_model = _model(seed=8)
    linears = prunable_linears(shared_model, ("model.layers.*",))
    products = []
    addmm_ = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_",
                        lambda acc, *args, **kw: products.append(1) or addmm_(acc, *args, **kw))
    shared, _ = collect_gradient_stats(shared_model, linears, blocks, bf16=bf16,
                                       statistics=STATISTICS, checkpointing=True)
    monkeypatch.undo()
    assert len(products) == 3 * TINY.layers * 4
    own_model = _model(seed=8)
    own_linears = prunable_linears(own_model, ("model.layers.*",))
    copies = [m.register_forward_pre_hook(lambda m, inputs: (inputs[0].clone(),))
              for n, m in own_linears.items() if n.endswith(("k_proj", "v_proj", "up_proj"))]
    own, _ = collect_gradient_stats(own_model, own_linears, blocks, bf16=bf16,
                                    statistics=STATISTICS, checkpointing=True)
    for hook in copies:
        hook.remove()
    assert len(copies) == 3 * TINY.layers
    for name in linears:
        for k in STATISTICS:
            assert torch.equal(shared[name][k], own[name][k]), f"{name}.{k}"
    attention = "model.layers.1.self_attn"
    for k in ("act_norm", "hessian"):
        assert torch.equal(shared[f"{attention}.q_proj"][k], shared[f"{attention}.v_proj"][k])
        # Separate tensors in the result, though their sums were shared.
        assert shared[f"{attention}.q_proj"][k].data_ptr() != \
            shared[f"{attention}.v_proj"][k].data_ptr()


def test_unknown_statistic_is_named():
    model = _model()
    with pytest.raises(ValueError, match="unknown statistic 'grad_cube'"):
        collect_gradient_stats(model, prunable_linears(model, ("model.layers.*",)), _blocks(1, 0),
                               bf16=False, statistics=["grad_cube"])


def test_statistics_each_criterion_reads():
    assert statistics_for([("gradient", "mean")]) == {"grad_mean"}
    assert statistics_for([("gradient", "rms"), ("taylor", "abs_mean")]) == \
        {"grad_sq_mean", "grad_abs_mean"}
    assert statistics_for([("magnitude", "mean"), ("random", "mean")]) == set()
    assert statistics_for([("gblm", "mean")]) == {"grad_sq_mean", "act_norm"}
    assert statistics_for([("sparsegpt", "mean"), ("wanda", "mean")]) == {"hessian", "act_norm"}
    with pytest.raises(ValueError, match="no criterion 'fisher' with variant 'rms'"):
        statistics_for([("fisher", "rms")])


def test_the_stage_collects_what_masks_and_compare_read():
    # The default rows: sparsegpt's (masks.calibration auto) take their Hessians layer by layer.
    assert requested_statistics(params_from_dict({})) == ("grad_mean", "act_norm")
    one_pass = params_from_dict({"masks": {"calibration": "one_pass"}})
    assert requested_statistics(one_pass) == ("grad_mean", "act_norm", "hessian")
    only_magnitude = params_from_dict({"masks": {"criterion": "magnitude"},
                                       "compare": {"criteria": ["magnitude", "random"]}})
    assert requested_statistics(only_magnitude) == ("act_norm",)
    rms = params_from_dict({"masks": {"variant": "rms"}, "compare": {"criteria": ["taylor"]}})
    with pytest.raises(ValueError, match="no criterion .taylor. with variant .rms."):
        requested_statistics(rms)
    abs_mean = params_from_dict({"masks": {"variant": "abs_mean"},
                                 "compare": {"criteria": ["taylor", "fisher"]}})
    assert requested_statistics(abs_mean) == ("grad_abs_mean", "grad_sq_mean")
    assert requested_statistics(params_from_dict({"gradients": {"statistics": "all"}})) == \
        STATISTICS


def test_load_stats_reads_only_the_statistics_asked_for_and_names_every_module(tmp_path):
    stats = {"a": {"grad_mean": torch.ones(2, 2), "hessian": torch.eye(2)},
             "b": {"grad_mean": torch.zeros(3, 2), "hessian": torch.eye(2)}}
    save_stats(tmp_path / "s.safetensors", stats, {"calibration_blocks": 1})
    got = load_stats(tmp_path / "s.safetensors", statistics=["grad_mean"])
    assert list(got) == ["a", "b"]
    assert {n: set(per) for n, per in got.items()} == {"a": {"grad_mean"}, "b": {"grad_mean"}}
    assert list(load_stats(tmp_path / "s.safetensors", statistics=[])) == ["a", "b"]


def test_masks_refuse_statistics_that_lack_what_the_criterion_reads():
    model = _model()
    linears = prunable_linears(model, ("model.layers.0.mlp.*",))
    stats, _ = collect_gradient_stats(model, linears, _blocks(1, 0), bf16=False,
                                      statistics=["grad_mean"])
    with pytest.raises(ValueError, match="hold no grad_sq_mean, which masks.criterion fisher"):
        prune(model, stats, MaskParams(criterion="fisher"), seed=0, n_blocks=1)
