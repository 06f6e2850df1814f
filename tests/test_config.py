"""params.yaml validation: defaults, the shipped files, and one clear error per bad value."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import dotted_changes, micro_params, params_over_defaults, record_refusal

from gradprune.config import (
    MaskParams,
    ParamError,
    Params,
    apply_overrides,
    load_params,
    params_from_dict,
)
from tasks.tracking import section_dict

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_validate():
    params = Params()
    params.check()
    assert params_from_dict(params_over_defaults({})) == params
    assert params.masks == MaskParams(criterion="gradient", tau=None, sparsity=0.5, scope="global")


def test_every_section_is_required():
    """A stage started on a file without a section must not run on built-in defaults."""
    with pytest.raises(ParamError) as info:
        params_from_dict({}, complete=True)
    record_refusal("params.yaml without its sections", str(info.value))
    assert str(info.value) == (
        "params: seed: missing sections seed, device, data, model, train, gradients, masks, "
        "finetune, average, evaluate, compare, mlflow; every section is required (seed, device, "
        "data, model, train, gradients, masks, finetune, average, evaluate, compare, mlflow): "
        "copy it from "
        "the repository's params.yaml")
    raw = params_over_defaults({})
    del raw["masks"]
    with pytest.raises(ParamError, match="^params: masks: missing section masks; every"):
        params_from_dict(raw, complete=True)
    raw = params_over_defaults({"finetune": None})  # `finetune:` with nothing under it
    with pytest.raises(ParamError, match="^params: finetune: missing section finetune;"):
        params_from_dict(raw, complete=True)


def test_empty_params_file_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    for text in ("", "# only a comment\n", "{}\n"):
        path.write_text(text)
        with pytest.raises(ParamError) as info:
            load_params(path)
        record_refusal(f"params.yaml that is empty ({text.strip() or 'no text'})",
                       str(info.value))
        assert str(info.value) == (f"params: {path}: is empty; every section (seed, data, "
                                   "model, ...) is required: copy the repository's params.yaml")


@pytest.mark.parametrize("changes, key, value", [
    ({"finetune": {"lr": float("inf")}}, "finetune.lr", "inf"),
    ({"train": {"grad_clip": float("nan")}}, "train.grad_clip", "nan"),
    ({"masks": {"sparsity": float("-inf")}}, "masks.sparsity", "-inf"),
    ({"masks": {"overrides": {"*.mlp.*": float("nan")}}}, "masks.overrides.*.mlp.*", "nan"),
])
def test_every_float_is_finite(changes, key, value):
    err = _error(changes)
    assert err.key == key
    assert str(err) == f"params: {key}: must be a finite number, got {value}"


def test_yaml_infinity_is_refused_with_its_key(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    text = (ROOT / "params.yaml").read_text().replace("  lr: 0.001\n", "  lr: .inf\n")
    assert text != (ROOT / "params.yaml").read_text() and raw["finetune"]["lr"] == 0.001
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamError, match=r"^params: finetune.lr: must be a finite number, got inf$"):
        load_params(tmp_path / "params.yaml")


def test_repo_params_yaml_loads():
    params = load_params(ROOT / "params.yaml")
    assert params.seed == 1234
    assert params.masks.sparsity == 0.5 and params.masks.tau is None
    assert params.gradients.include == ("model.layers.*",)
    assert params.evaluate.bf16 == "auto"
    assert params.compare.patterns == ("unstructured", "2:4")  # YAML 1.2: "2:4" is a string
    assert isinstance(params.model.rope_theta, float)


def test_micro_params_yaml_loads():
    params = params_from_dict(micro_params())
    assert params.seed == 7
    assert params.model.hidden == 32 and params.model.heads == 4 and params.model.kv_heads == 2
    assert params.finetune.checkpoints == 3 and params.finetune.steps == 9
    # keys the micro file leaves out come from the repository's params.yaml
    assert params.finetune.weight_decay == 0.0
    assert params.masks.scope == "global"


def test_missing_params_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "p.yaml"))):
        load_params(tmp_path / "p.yaml")


def test_invalid_yaml_is_param_error(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("masks: [unclosed\n")
    with pytest.raises(ParamError, match="not valid YAML"):
        load_params(path)


def _error(changes: dict) -> ParamError:
    with pytest.raises(ParamError) as info:
        params_from_dict(params_over_defaults(changes))
    record_refusal(dotted_changes(changes), str(info.value))
    return info.value


@pytest.mark.parametrize("raw, key, allowed", [
    ({"masks": {"sparsity": 1.0}}, "masks.sparsity", "must be in [0, 1), got 1.0"),
    ({"masks": {"sparsity": -0.1}}, "masks.sparsity", "must be in [0, 1), got -0.1"),
    ({"masks": {"tau": 0.1, "sparsity": 0.5}}, "masks.tau",
     "set exactly one of masks.tau and masks.sparsity"),
    ({"masks": {"tau": None, "sparsity": None}}, "masks.tau",
     "set exactly one of masks.tau and masks.sparsity"),
    ({"masks": {"tau": -1.0, "sparsity": None}}, "masks.tau", "must be >= 0"),
    ({"masks": {"criterion": "wandaa"}}, "masks.criterion",
     "got 'wandaa'; allowed: 'gradient', 'taylor', 'fisher', 'magnitude', 'wanda', 'gblm', "
     "'random', 'sparsegpt'"),
    ({"masks": {"scope": "row"}}, "masks.scope", "allowed: 'global', 'per_layer'"),
    ({"train": {"bf16": True}}, "train.bf16", "allowed: 'auto', 'on', 'off'"),
    ({"model": {"layers": "four"}}, "model.layers", "must be an integer, got 'four'"),
    ({"model": {"layers": True}}, "model.layers", "must be an integer, got True"),
    ({"train": {"steps": 2.5}}, "train.steps", "must be an integer, got 2.5"),
    ({"train": {"lr": "fast"}}, "train.lr", "must be a number, got 'fast'"),
    ({"model": {"tie_embeddings": 1}}, "model.tie_embeddings", "must be true or false, got 1"),
    ({"data": {"source": None}}, "data.source", "must be a string, got None"),
    ({"gradients": {"include": "model.*"}}, "gradients.include", "must be a list"),
    ({"gradients": {"include": ["ok", 3]}}, "gradients.include[1]", "must be a string, got 3"),
    ({"model": {"hidden": 30, "heads": 4}}, "model.heads", "must divide model.hidden (30)"),
    ({"model": {"heads": 8, "kv_heads": 3}}, "model.kv_heads", "must divide model.heads (8)"),
    ({"finetune": {"steps": 5, "warmup_steps": 1, "checkpoints": 6}}, "finetune.checkpoints",
     "must be in [1, finetune.steps=5]"),
    ({"finetune": {"steps": 5, "warmup_steps": 6}}, "finetune.warmup_steps",
     "must be in [0, steps=5]"),
    ({"train": {"min_lr": 0.1}}, "train.min_lr", "must be in [0, lr=0.003]"),
    ({"average": {"temperature": 0.0}}, "average.temperature", "must be positive"),
    ({"data": {"val_fraction": 0.5, "test_fraction": 0.5}}, "data.test_fraction",
     "val_fraction + test_fraction must be below 1"),
    ({"masks": "dense"}, "masks", "must be a mapping"),
    ({"masks": {"pattern": "4:2"}}, "masks.pattern", "allowed: 'unstructured', 'N:M'"),
    ({"masks": {"criterion": "magnitude", "variant": "rms"}}, "masks.variant",
     "magnitude allows 'mean'"),
    ({"evaluate": {"tasks": ["mmlu"]}}, "evaluate.tasks[0]", "got 'mmlu'; allowed: hellaswag"),
    ({"evaluate": {"context": 64, "stride": 65}}, "evaluate.stride",
     "must not exceed evaluate.context (64)"),
    ({"evaluate": {"context": 512}}, "evaluate.context", "must not exceed data.block_size (256)"),
    ({"compare": {"criteria": ["obs"]}}, "compare.criteria[0]", "got 'obs'"),
    ({"evaluate": {"wikitext": "no/such/wiki.test.txt"}}, "evaluate.wikitext",
     "no/such/wiki.test.txt does not exist; give WikiText-2's test split"),
    ({"evaluate": {"wikitext_context": 1}}, "evaluate.wikitext_context", "at least 2"),
    ({"evaluate": {"sample_seed": "random"}}, "evaluate.sample_seed",
     "must be an integer, got 'random'"),
])
def test_bad_value_names_key_and_what_is_allowed(raw, key, allowed):
    err = _error(raw)
    assert err.key == key
    assert str(err).startswith(f"params: {key}: ")
    assert allowed in str(err)


def test_unknown_key_lists_allowed_keys():
    err = _error({"masks": {"sparsity": 0.5, "sparsty": 0.7}})  # recorded by _error
    assert err.key == "masks.sparsty"
    assert "unknown key; allowed keys here: criterion, variant, gblm_alpha, tau, sparsity, " \
           "scope, pattern" in str(err)
    top = _error({"maskz": {}})
    assert top.key == "maskz"
    assert "allowed keys here: seed, device, data, model, train" in str(top)


def test_param_error_is_value_error():
    assert issubclass(ParamError, ValueError)


def test_tau_alone_is_valid_and_int_becomes_float():
    params = params_from_dict(params_over_defaults({"masks": {"tau": 0, "sparsity": None},
                                                    "compare": {"sparsity": 0.5}}))
    assert params.masks.tau == 0.0 and isinstance(params.masks.tau, float)
    assert params.masks.sparsity is None


def test_apply_overrides_parses_yaml_values():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    out = apply_overrides(raw, ["masks.sparsity=0.7", "masks.scope=per_layer", "seed=5"])
    assert out["masks"]["sparsity"] == 0.7 and isinstance(out["masks"]["sparsity"], float)
    assert out["masks"]["scope"] == "per_layer"
    assert out["seed"] == 5
    assert raw["masks"]["sparsity"] == 0.5  # the input is not modified
    assert params_from_dict(out).masks.sparsity == 0.7
    # the mapping form and a null value
    out = apply_overrides(raw, {"masks.tau": 0.01, "masks.sparsity": None,
                                "compare.sparsity": 0.5})
    assert params_from_dict(out).masks.tau == 0.01
    # tau without a sparsity for the comparison rows names the key to set
    with pytest.raises(ParamError, match="compare.sparsity: set it when masks uses tau"):
        apply_overrides(raw, {"masks.tau": 0.01, "masks.sparsity": None})
    # YAML 1.2 values, as DVC writes them: 2:4 stays a string, 1e-3 is a float
    out = apply_overrides(raw, ["masks.pattern=2:4", "train.lr=1e-3"])
    assert out["masks"]["pattern"] == "2:4" and out["train"]["lr"] == 0.001


def test_apply_overrides_unknown_or_bad_key_raises():
    raw = params_over_defaults({})
    with pytest.raises(ParamError) as info:
        apply_overrides(raw, ["masks.sparsityy=0.7"])
    record_refusal("override masks.sparsityy=0.7", str(info.value))
    assert info.value.key == "masks.sparsityy"
    assert "allowed keys here" in str(info.value)
    with pytest.raises(ParamError, match="masks.sparsity: must be in"):
        apply_overrides(raw, ["masks.sparsity=1.5"])
    with pytest.raises(ParamError, match="key.path=value"):
        apply_overrides(raw, ["masks.sparsity"])
    with pytest.raises(ParamError, match="seed is not a section"):
        apply_overrides({"seed": 1}, ["seed.x=1"])


def test_section_dict_flattens():
    params = params_from_dict(params_over_defaults({"masks": {"sparsity": 0.25}}))
    flat = section_dict(params, "masks")
    assert {k: flat[k] for k in ("masks.criterion", "masks.tau", "masks.sparsity",
                                 "masks.scope")} == {"masks.criterion": "gradient",
                                                     "masks.tau": None, "masks.sparsity": 0.25,
                                                     "masks.scope": "global"}
    assert section_dict(params, "seed") == {"seed": 1234}
