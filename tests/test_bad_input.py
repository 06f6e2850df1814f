"""Bad input stops before compute with a message naming the key or path, and writes nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, micro_params, record_refusal


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def write_params(folder: Path, **sections) -> Path:
    params = micro_params()
    for section, values in sections.items():
        if isinstance(values, dict):
            params.setdefault(section, {}).update(values)
        else:
            params[section] = values
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def run_prepare(monkeypatch, params: Path) -> int:
    from tasks import prepare
    from tasks.stage import stage_main

    monkeypatch.setattr(sys, "argv", ["tasks.prepare", "--params", str(params)])
    with pytest.raises(SystemExit) as exit_info:
        stage_main("prepare", prepare.run)
    return exit_info.value.code


def first_error(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("error: "))


def assert_nothing_written(folder: Path) -> None:
    for name in ("data", "metrics", "plots"):
        leftovers = [p for p in (folder / name).rglob("*")] if (folder / name).exists() else []
        assert leftovers == [], leftovers


@pytest.mark.parametrize("masks, expected", [
    ({"sparsity": 1.0}, "masks.sparsity: must be in [0, 1)"),
    ({"sparsity": -0.1}, "masks.sparsity: must be in [0, 1)"),
    ({"tau": 0.001, "sparsity": 0.5}, "set exactly one of masks.tau and masks.sparsity"),
    ({"criterion": "wandaa"}, "masks.criterion: got 'wandaa'; allowed: 'gradient', 'taylor', "
                              "'fisher', 'magnitude', 'wanda', 'gblm', 'random', 'sparsegpt'"),
    ({"scope": "row"}, "masks.scope: got 'row'; allowed: 'global', 'per_layer', 'per_row'"),
    ({"pattern": "2:4", "sparsity": 0.7}, "masks.sparsity: pattern 2:4 keeps 2 of every 4"),
])
def test_bad_mask_params_name_the_key(workdir, monkeypatch, capsys, masks, expected):
    code = run_prepare(monkeypatch, write_params(workdir, masks=masks))
    assert code == 2
    assert expected in capsys.readouterr().err
    assert_nothing_written(workdir)
    assert not (workdir / "mlflow.db").exists()


def test_missing_corpus_path_names_the_path(workdir, monkeypatch, capsys):
    missing = workdir / "no_such_corpus.txt"
    code = run_prepare(monkeypatch, write_params(workdir, data={"source": str(missing)}))
    assert code == 2
    err = capsys.readouterr().err
    record_refusal("data.source: a file that does not exist", first_error(err))
    assert "data.source" in err and str(missing) in err and "does not exist" in err
    assert_nothing_written(workdir)


def test_corpus_too_small_for_a_block_per_split(workdir, monkeypatch, capsys):
    corpus = workdir / "tiny.txt"
    corpus.write_text("One short document.\n\nAnother short one.\n\nA third.\n\nAnd a fourth.\n")
    code = run_prepare(monkeypatch, write_params(workdir, data={"source": str(corpus)}))
    assert code == 1
    err = capsys.readouterr().err
    record_refusal("data.source: a corpus too small for one block per split", first_error(err))
    assert f"the train split of {corpus} holds fewer than data.block_size=64 tokens" in err
    # Train gets what val and test leave: the fix lowers their fractions, never raises one.
    assert ("use a larger corpus, lower data.val_fraction + data.test_fraction (now 0.1 + 0.1) "
            "to leave train more documents, raise data.max_documents (now 240), or lower "
            "data.block_size") in err
    assert_nothing_written(workdir)


def test_small_split_fix_names_the_split_own_fraction():
    from gradprune.config import DataParams
    from tasks.prepare import too_small_fix

    cfg = DataParams(val_fraction=0.05, test_fraction=0.02)
    assert too_small_fix("test", cfg) == ("use a larger corpus, raise data.test_fraction "
                                          "(now 0.02), or lower data.block_size")
    assert too_small_fix("val", cfg) == ("use a larger corpus, raise data.val_fraction "
                                         "(now 0.05), or lower data.block_size")
    assert too_small_fix("train", cfg) == (
        "use a larger corpus, lower data.val_fraction + data.test_fraction (now 0.05 + 0.02) "
        "to leave train more documents, or lower data.block_size")


@pytest.mark.parametrize("text, expected", [
    ("", "params: {path}: is empty; every section (seed, data, model, ...) is required"),
    ("seed: 3\n", "params: device: missing sections device, data, model, train, gradients, masks, "
                  "finetune, average, evaluate, compare, mlflow; every section is required"),
])
def test_stage_refuses_an_empty_or_partial_params_file(workdir, monkeypatch, capsys, text,
                                                       expected):
    params = workdir / "params.yaml"
    params.write_text(text)
    assert run_prepare(monkeypatch, params) == 2
    err = capsys.readouterr().err
    record_refusal(f"a stage started on params.yaml holding {text.strip() or 'nothing'!r}",
                   first_error(err))
    assert expected.format(path=params) in err
    assert_nothing_written(workdir)


def test_infinite_learning_rate_stops_before_compute(workdir, monkeypatch, capsys):
    code = run_prepare(monkeypatch, write_params(workdir, finetune={"lr": float("inf")}))
    assert code == 2
    assert "params: finetune.lr: must be a finite number, got inf" in capsys.readouterr().err
    assert_nothing_written(workdir)


def test_unknown_key_lists_the_allowed_keys(workdir, monkeypatch, capsys):
    code = run_prepare(monkeypatch, write_params(workdir, finetune={"stepz": 3}))
    assert code == 2
    assert "finetune.stepz: unknown key; allowed keys here: steps," in capsys.readouterr().err


def test_command_line_exit_code_and_message(workdir):
    params = write_params(workdir, masks={"sparsity": 1.5})
    done = subprocess.run([sys.executable, "-m", "tasks.masks", "--params", str(params)],
                          cwd=workdir, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    assert "masks.sparsity: must be in [0, 1), got 1.5" in done.stderr
    assert_nothing_written(workdir)
