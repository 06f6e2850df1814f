"""Shared test setup: offline settings for DVC, MLflow and Prefect, and micro pipeline repos."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MICRO_PARAMS = ROOT / "tests" / "micro_params.yaml"

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("GRADPRUNE_PARENT_RUN_ID", None)


def run_env(tmp_home: Path) -> dict[str, str]:
    """Environment for pipeline subprocesses: this interpreter first on PATH, a private
    Prefect home, and no tracking URI inherited from the developer's shell."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PREFECT_HOME"] = str(tmp_home / "prefect")
    env.pop("PREFECT_API_URL", None)
    # mlflow.set_tracking_uri() in this process exports MLFLOW_TRACKING_URI; a pipeline run
    # must use its own repository's store.
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def deep_merge(base: dict, changes: dict) -> dict:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and value:
            merged[key] = deep_merge(base[key], value)
        else:
            merged[key] = value
    return merged


def record_refusal(kind: str, message: str) -> None:
    """What a bad-input test fed in and the message the user got, appended as a JSON line to
    $GRADPRUNE_REFUSALS when set: scripts/reliability_table.py makes docs/RELIABILITY.md's
    table of refused inputs from these records."""
    import json

    path = os.environ.get("GRADPRUNE_REFUSALS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"kind": kind, "message": message.strip()}) + "\n")


def dotted_changes(changes: dict, prefix: str = "") -> str:
    """{"masks": {"sparsity": 1.5}} -> "masks.sparsity: 1.5", as a table row names an input."""
    parts = []
    for key, value in changes.items():
        if isinstance(value, dict) and value:
            parts.append(dotted_changes(value, f"{prefix}{key}."))
        else:
            parts.append(f"{prefix}{key}: {json.dumps(value) if not isinstance(value, float) else value}")
    return ", ".join(parts)


def params_over_defaults(changes: dict) -> dict:
    """A complete raw params dict: the schema's defaults with `changes` laid over them. Every
    section is required, so a test that sets a few keys says where the rest come from."""
    import dataclasses

    from gradprune.config import Params

    return deep_merge(dataclasses.asdict(Params()), changes)


def micro_params() -> dict:
    """The repository's params.yaml with tests/micro_params.yaml laid over it: every key that
    dvc.yaml names is present, as DVC requires."""
    return deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                      yaml.safe_load(MICRO_PARAMS.read_text()))


def make_micro_repo(folder: Path, overrides: dict | None = None) -> Path:
    """A git + DVC repository holding the pipeline code and the micro params."""
    folder.mkdir(parents=True)
    for name in ("gradprune", "tasks", "flows"):
        shutil.copytree(ROOT / name, folder / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, folder / name)
    (folder / "params.yaml").write_text(yaml.safe_dump(deep_merge(micro_params(),
                                                                   overrides or {})))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=folder, check=True)
    shutil.copy(ROOT / ".dvc" / "config", folder / ".dvc" / "config")
    subprocess.run(["git", "add", "-A"], cwd=folder, check=True)
    subprocess.run(git + ["commit", "-qm", "micro pipeline"], cwd=folder, check=True)
    return folder


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session")


# fp32 where processes are compared (bf16 rounding would hide the reduction-order
# differences); a lighter evaluate and compare row, which every sweep point runs.
# One-pass calibration, so that the gradient pass also takes the Hessians the sparsegpt row
# reads (the data-parallel test checks their sum over processes).
UPSTREAM_PARAMS = {"gradients": {"bf16": "off"}, "masks": {"calibration": "one_pass"},
                   "finetune": {"bf16": "off"},
                   "evaluate": {"tasks": ["piqa"], "speed": {"enabled": False}},
                   "compare": {"zeroshot": False, "finetune": False}}


@pytest.fixture(scope="session")
def micro_upstream(session_tmp) -> Path:
    """A micro repository through `dvc repro masks` (prepare, train, gradients, masks), fp32
    statistics and fine-tuning; tests copy it rather than change it."""
    repo = make_micro_repo(session_tmp / "upstream", UPSTREAM_PARAMS)
    run([sys.executable, "-m", "dvc", "repro", "masks"], repo, run_env(session_tmp), timeout=900)
    return repo


def copy_repo(repo: Path, folder: Path) -> Path:
    """A copy of a micro repository, git history, DVC cache and workspace included."""
    shutil.copytree(repo, folder, symlinks=True)
    return folder


TINY_DOCS = ["the market opened higher today and shares rose", "rain fell on the city all night",
             "the team won the final match of the season"] * 20


def tiny_llama_folder(folder: Path, seed: int = 0, ffn: int = 64, card: str | None = None,
                      tie: bool = False) -> Path:
    """A Hugging Face folder of a one-layer LLaMA (hidden 32) with a 300-token BPE tokenizer,
    context 32, built and saved as the train stage does."""
    from gradprune.config.schema import ModelParams
    from gradprune.data import train_bpe_tokenizer
    from gradprune.export.card import save_hf_folder
    from gradprune.models.llama import build_llama

    tokenizer = train_bpe_tokenizer(TINY_DOCS, 300)
    model = build_llama(ModelParams(layers=1, hidden=32, heads=4, kv_heads=2, ffn=ffn,
                                    tie_embeddings=tie),
                        len(tokenizer), 32, tokenizer.eos_token_id, seed)
    save_hf_folder(model, tokenizer, folder, card)
    return folder
