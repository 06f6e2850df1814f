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
