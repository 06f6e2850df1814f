"""A tracking store that fails never stops a stage: the stage warns once, runs on untracked and
lists itself for `gradprune track`; runs whose process died are marked KILLED, not left
RUNNING."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, deep_merge, micro_params

from gradprune.config import params_from_dict
from gradprune.io import read_json, write_json
from tasks.tracking import (
    UNTRACKED,
    configure_tracking,
    end_abandoned_runs,
    process_alive,
    process_key,
    stage_run,
    track_untracked,
)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def repo(tmp_path, monkeypatch):
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("GRADPRUNE_PARENT_RUN_ID", raising=False)
    return tmp_path


def params_with(uri: str):
    return params_from_dict(deep_merge(micro_params(), {"mlflow": {"tracking_uri": uri}}))


def test_a_store_that_is_down_never_stops_a_stage(repo, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    params = params_with(f"http://127.0.0.1:{closed_port()}")
    (repo / "metrics").mkdir()
    write_json(repo / "metrics" / "masks.json", {"kept": 3})
    with caplog.at_level("WARNING", logger="gradprune.tracking"):
        with stage_run("masks", params) as tracked:
            tracked.log_artifact(repo / "metrics" / "masks.json", "masks")
            tracked.log_metrics({"kept": 3}, repo / "metrics" / "masks.json")
            assert tracked.register_model(repo / "metrics") is None
    assert tracked.lost and tracked.run_id is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "gradprune.tracking"]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"tracking: MLflow at {params.mlflow.tracking_uri} failed (")
    assert warnings[0].endswith("the stage goes on untracked and writes its outputs as usual; "
                                "`gradprune track` logs it once the store is back")
    (entry,) = read_json(repo / UNTRACKED)
    assert (entry["stage"], entry["run_id"]) == ("masks", None)


def test_gradprune_track_logs_the_stages_later(repo):
    from mlflow.tracking import MlflowClient

    params = params_with(f"sqlite:///{repo / 'mlflow.db'}")
    (repo / "reports" / "environment").mkdir(parents=True)
    write_json(repo / "metrics" / "masks.json", {"kept": 3, "sparsity_achieved": 0.5})
    write_json(repo / "reports" / "environment" / "masks.json", {"threads": 1})
    write_json(repo / UNTRACKED, [{"stage": "masks", "run_id": None, "reason": "down",
                                   "time": "now"}])
    assert track_untracked(params, repo) == ["masks"]
    assert not (repo / UNTRACKED).exists()
    experiment_id = configure_tracking(params, repo)
    runs = {r.info.run_name: r for r in MlflowClient().search_runs([experiment_id])}
    backfilled = runs["masks"]
    assert backfilled.info.status == "FINISHED"
    assert backfilled.data.metrics == {"kept": 3.0, "sparsity_achieved": 0.5}
    assert backfilled.data.tags["gradprune.backfill"] == "true"
    assert backfilled.data.params["masks.sparsity"] == "0.5"
    assert track_untracked(params, repo) == []


@pytest.mark.integration
def test_runs_of_dead_processes_are_marked_killed(repo):
    from mlflow.tracking import MlflowClient

    params = params_with(f"sqlite:///{repo / 'mlflow.db'}")
    experiment_id = configure_tracking(params, repo)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    dead = process_key(gone.pid)
    gone.wait()
    assert not process_alive(dead) and process_alive(process_key())
    client = MlflowClient()
    orphan = client.create_run(experiment_id, tags={"gradprune.process": dead}).info.run_id
    live = client.create_run(experiment_id, tags={"gradprune.process": process_key()}).info.run_id
    assert end_abandoned_runs(experiment_id) == [orphan]
    assert client.get_run(orphan).info.status == "KILLED"
    assert client.get_run(live).info.status == "RUNNING"
