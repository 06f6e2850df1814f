"""Presets: every shipped preset is valid, and `gradprune exp` hands DVC `-S` arguments that
DVC's own (Hydra) parser turns into exactly the params `--set` writes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import ROOT

from flows.overrides import dvc_set_arguments, preset_overrides
from gradprune.config import ParamError, apply_overrides, read_params_file

PRESETS = sorted((ROOT / "presets").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_dvc_reads_a_preset_as_gradprune_does(tmp_path, preset):
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    # OWL's layer sparsities are unstructured: a preset that asks for them goes back to
    # uniform beside the 2:4 pattern this test sets.
    overrides = {**preset_overrides(str(preset)), "masks.pattern": "2:4",
                 "masks.allocation": "uniform",
                 "masks.exclude": ["*.o_proj", "it's"], "compare.scopes": {"wanda": "per_row"}}
    expected = apply_overrides(read_params_file(ROOT / "params.yaml"), overrides)

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    args = dvc_set_arguments(overrides, str(params))
    dvc_apply_overrides(str(params), [a for a in args if a != "-S"])
    assert read_params_file(params) == expected


def test_a_preset_sets_dotted_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("masks:\n  sparsity: 0.7\n")
    with pytest.raises(ParamError, match="dotted keys"):
        preset_overrides(str(bad))


def test_a_bad_preset_value_names_its_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("masks.sparsity: 2\n")
    with pytest.raises(ParamError, match="masks.sparsity"):
        dvc_set_arguments(preset_overrides(str(bad)), str(Path(ROOT / "params.yaml")))
