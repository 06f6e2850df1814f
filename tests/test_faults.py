"""Faults a long pipeline on shared infrastructure meets, injected into real `dvc repro` runs of
the micro DAG: hostile params, bad params after outputs exist, killed stages, failed writes,
a tracking server that goes away. Each test is a reproduction kept from docs/RELIABILITY.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import copy_repo, run_env

DVC = [sys.executable, "-m", "dvc"]


def set_params(repo: Path, **sections) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


def attempt(cmd: list[str], repo: Path, env: dict, timeout: int = 900):
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.integration
@pytest.mark.parametrize("compare, refused", [
    ({"criteria": ["x; touch owned; true"]},
     "params: compare.criteria[0]: got 'x; touch owned; true'; allowed: gradient"),
    # Broke out of the double quotes the command once put around the pattern.
    ({"patterns": ['2:4"; touch owned; echo "']},
     "params: compare.patterns[0]: got '2:4\"; touch owned; echo \"'; allowed: 'unstructured'"),
])
def test_shell_code_in_params_never_runs(micro_upstream, tmp_path, compare, refused):
    repo = copy_repo(micro_upstream, tmp_path / "repo")
    set_params(repo, compare=compare)
    code, log = attempt(DVC + ["repro", "compare"], repo, run_env(tmp_path))
    assert code != 0
    assert refused in log
    assert not (repo / "owned").exists() and not list(tmp_path.rglob("owned"))


def snapshot(repo: Path, *paths: str) -> dict[str, bytes]:
    files = {}
    for path in paths:
        top = repo / path
        for file in [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()):
            files[file.relative_to(repo).as_posix()] = file.read_bytes()
    return files


def commit_all(repo: Path, message: str) -> None:
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-qm", message], cwd=repo, check=True)


@pytest.mark.integration
def test_bad_params_after_a_run_are_cheap_to_recover(micro_upstream, tmp_path):
    """`dvc repro` removes a stage's outputs before the stage can refuse its params:
    `gradprune check` refuses first and removes nothing; after a refused `dvc repro`, the
    commands the stage prints restore every byte."""
    repo = copy_repo(micro_upstream, tmp_path / "repo")
    env = run_env(tmp_path)
    commit_all(repo, "a finished run")
    outputs = ("data/masks", "metrics/masks.json")
    before = snapshot(repo, *outputs)
    assert len(before) >= 3
    set_params(repo, masks={"sparsity": 1.5})

    code, log = attempt([sys.executable, "-m", "flows", "check"], repo, env)
    assert code == 2
    assert "error: params: masks.sparsity: must be in [0, 1), got 1.5" in log
    assert snapshot(repo, *outputs) == before

    code, log = attempt(DVC + ["repro", "masks"], repo, env)
    assert code != 0
    assert "error: params: masks.sparsity: must be in [0, 1), got 1.5" in log
    assert ("note: dvc repro removed this stage's outputs before it ran; `dvc checkout masks` "
            "restores data/masks from DVC's cache; `git checkout -- metrics/masks.json` restores "
            "the committed copy") in log
    assert snapshot(repo, *outputs) == {}  # what DVC did before the stage could refuse

    subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=repo, check=True)  # the fix
    attempt(DVC + ["checkout", "masks"], repo, env)
    subprocess.run(["git", "checkout", "--", "metrics/masks.json"], cwd=repo, check=True)
    assert snapshot(repo, *outputs) == before
    code, log = attempt(DVC + ["status", "masks"], repo, env)
    assert (code, log.strip()) == (0, "Data and pipelines are up to date.")
