"""Sweeps: a 2 x 2 grid on the micro config, every point a DVC experiment run from the queue,
the shared upstream stages computed once and restored, never rerun, by every point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, copy_repo, run, run_env

from flows.overrides import parse_grid, split_values
from flows.sweep import check_points, grid_points, shared_stages
from gradprune.config import ParamError

DVC = [sys.executable, "-m", "dvc"]
# Keys that stop at the masks stage, so the gradient pass is shared (masks.criterion reaches
# it: gradients.statistics auto collects what the criteria read).
GRID = ["--grid", "masks.scope=global,per_layer", "--grid", "masks.sparsity=0.5,0.7"]
POINTS = [("global", 0.5), ("global", 0.7), ("per_layer", 0.5), ("per_layer", 0.7)]


def test_grid_values_split_at_top_level_commas_and_parse_as_yaml():
    assert split_values("gradient,magnitude") == ["gradient", "magnitude"]
    assert split_values('[1, 2],{"a": 1, "b": 2},"x,y"') == ['[1, 2]', '{"a": 1, "b": 2}', '"x,y"']
    assert parse_grid(["masks.sparsity=0.5,0.7", "masks.pattern=2:4,unstructured"]) == {
        "masks.sparsity": [0.5, 0.7], "masks.pattern": ["2:4", "unstructured"]}
    with pytest.raises(ParamError, match="masks.sparsity: --grid gives it twice"):
        parse_grid(["masks.sparsity=0.5", "masks.sparsity=0.7"])
    with pytest.raises(ParamError, match="written key.path=value"):
        parse_grid(["masks.sparsity"])


def test_grid_points_are_every_combination_in_order():
    assert grid_points({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    with pytest.raises(ParamError, match="masks.sparsity: repeats a value"):
        grid_points({"masks.sparsity": [0.5, 0.5]})


def test_a_bad_grid_point_names_its_key():
    params = ROOT / "params.yaml"
    with pytest.raises(ParamError, match="masks.criterio: unknown key"):
        check_points(params, grid_points({"masks.criterio": ["gradient"]}))
    with pytest.raises(ParamError, match=r"masks.sparsity: must be in \[0, 1\), got 1.5"):
        check_points(params, grid_points({"masks.sparsity": [0.5, 1.5]}))


@pytest.mark.parametrize("keys, shared", [
    # the gradient pass collects what the criteria read (gradients.statistics auto)
    (["masks.criterion"], ["prepare", "train"]),
    (["masks.sparsity"], ["prepare", "train", "gradients"]),
    # compare rows may fine-tune, so they read finetune.*
    (["finetune.lr"], ["prepare", "train", "gradients", "masks"]),
    (["average.method"], ["prepare", "train", "gradients", "masks", "finetune"]),
    (["gradients.calibration_blocks"], ["prepare", "train"]),
    (["seed"], []),
])
def test_shared_stages_are_those_no_grid_key_reaches(keys, shared):
    assert shared_stages(ROOT / "dvc.yaml", keys) == shared


@pytest.mark.integration
def test_the_cli_rejects_a_bad_grid_before_running_anything(tmp_path):
    done = subprocess.run([sys.executable, "-m", "flows", "sweep", "--grid",
                           "masks.criterio=gradient,magnitude"],
                          cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "params: masks.criterio: unknown key" in done.stderr


@pytest.fixture(scope="module")
def swept(micro_upstream, session_tmp):
    repo = copy_repo(micro_upstream, session_tmp / "sweep")
    env = run_env(session_tmp)
    log = run([sys.executable, "-m", "flows", "sweep", *GRID, "--jobs", "2", "--name", "sw"],
              repo, env, timeout=2400)  # about 3 minutes on 2 idle cores
    return repo, env, json.loads(log[log.index("{\n"):log.rindex("}") + 1])


@pytest.mark.integration
def test_every_point_is_an_experiment_that_reuses_the_shared_stages(swept):
    repo, env, outcome = swept
    # The copied repository holds them already: DVC skips them in the workspace too.
    assert outcome["shared_stages"] == dict.fromkeys(["prepare", "train", "gradients"], "skipped")
    rows = outcome["points"]
    assert [(r["masks.scope"], r["masks.sparsity"]) for r in rows] == POINTS
    assert [r["experiment"] for r in rows] == ["sw-0", "sw-1", "sw-2", "sw-3"]
    for row in rows:
        assert row["status"] == "Success"
        ran = set(row["stages_ran"].split(", "))
        restored = set(row["stages_restored"].split(", "))
        # Restored from DVC's run-cache in every point's workspace, never recomputed.
        assert {"prepare", "train", "gradients"} <= restored and not restored & ran, row
        assert {"finetune", "average", "evaluate"} <= ran, row
        # The upstream repository made global masks at 0.5: that point restores them too.
        first = (row["masks.scope"], row["masks.sparsity"]) == POINTS[0]
        assert ("masks" in restored, "masks" in ran) == (first, not first), row
        assert row["sparsity"] == pytest.approx(row["masks.sparsity"], abs=0.01)
        assert row["ppl_averaged"] > 1 and row["ppl_dense"] > 1
    # One dense model for all: the same ppl_dense everywhere.
    assert len({r["ppl_dense"] for r in rows}) == 1
    # The scope matters: at each sparsity the two scopes prune differently.
    for sparsity in (0.5, 0.7):
        pruned = {r["masks.scope"]: r["ppl_pruned"] for r in rows
                  if r["masks.sparsity"] == sparsity}
        assert pruned["global"] != pruned["per_layer"]

    shown = run(DVC + ["exp", "show", "--csv"], repo, env)
    for name in ("sw-0", "sw-1", "sw-2", "sw-3"):
        assert f"\n{name}," in shown


@pytest.mark.integration
def test_the_sweep_writes_one_table_and_one_plot(swept):
    import pyarrow.parquet as pq

    repo, _, outcome = swept
    folder = Path(outcome["results"])
    assert folder == repo / "sweeps" / "sw"
    table = pq.read_table(folder / "results.parquet").to_pylist()
    assert [(r["masks.scope"], r["masks.sparsity"]) for r in table] == POINTS
    assert [r["ppl_averaged"] for r in table] == [r["ppl_averaged"] for r in outcome["points"]]
    csv_lines = (folder / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("experiment,masks.scope,masks.sparsity,status,")
    assert len(csv_lines) == 5
    markdown = (folder / "results.md").read_text().splitlines()
    assert markdown[0].startswith("| experiment | masks.scope | masks.sparsity |")
    assert len(markdown) == 6
    assert (folder / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_the_sweep_is_one_mlflow_parent_over_the_points(swept):
    import mlflow
    from mlflow.tracking import MlflowClient

    repo, _, _ = swept
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("gradprune")
    runs = client.search_runs([experiment.experiment_id])
    (sweep_run,) = [r for r in runs if r.data.tags.get("gradprune.launcher") == "prefect-sweep"]
    assert (sweep_run.info.run_name, sweep_run.info.status) == ("sweep sw", "FINISHED")
    points = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep_run.info.run_id]
    assert sorted(r.data.tags["gradprune.experiment"] for r in points) == [
        "sw-0", "sw-1", "sw-2", "sw-3"]
    for point in points:
        stages = sorted(r.info.run_name for r in runs
                        if r.data.tags.get("mlflow.parentRunId") == point.info.run_id)
        assert {"finetune", "average", "evaluate"} <= set(stages), stages
        assert not {"prepare", "train", "gradients"} & set(stages), stages
    artifacts = {a.path for a in client.list_artifacts(sweep_run.info.run_id, "sweep")}
    assert {"sweep/results.parquet", "sweep/results.md", "sweep/perplexity.png"} <= artifacts


def wait_for_file_text(folder: Path, pattern: str, text: str, proc: subprocess.Popen,
                       log: Path, timeout: float = 600) -> Path:
    """The first file under folder matching pattern that contains text, once there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in folder.glob(pattern):
            if text in path.read_text(errors="replace"):
                return path
        if proc.poll() is not None:
            pytest.fail(f"the sweep exited ({proc.returncode}) first:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"no {folder}/{pattern} with {text!r} within {timeout} s")


@pytest.mark.integration
def test_a_point_whose_queue_worker_is_killed_is_rerun(micro_upstream, session_tmp):
    """SIGKILL the queue worker while it runs a point's stage: DVC leaves the point Running for
    ever; the sweep kills the orphaned experiment process, reruns the point and names it."""
    repo = copy_repo(micro_upstream, session_tmp / "sweep-worker-killed")
    log = session_tmp / "sweep-worker-killed.log"
    # evaluate.* keys leave the points only compare and evaluate to run; one worker at a time.
    with open(log, "w") as out:
        sweep = subprocess.Popen([sys.executable, "-m", "flows", "sweep", "--grid",
                                  "evaluate.max_tokens=512,1024", "--jobs", "1", "--name", "wk"],
                                 cwd=repo, env=run_env(session_tmp), stdout=out,
                                 stderr=subprocess.STDOUT)
    try:
        point_log = wait_for_file_text(repo / ".dvc" / "tmp" / "exps" / "run", "*/*.out",
                                       "Running stage", sweep, log)
        killed = json.loads(point_log.with_suffix(".run").read_text())["name"]
        orphan = json.loads(point_log.with_suffix(".json").read_text())["pid"]
        worker = repo / ".dvc" / "tmp" / "exps" / "celery" / "dvc-exp-worker-1.pid"
        os.kill(int(worker.read_text()), signal.SIGKILL)
        sweep.wait(timeout=1200)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
    text = log.read_text()
    assert sweep.returncode == 0, text[-3000:]
    assert f"point {killed}: its queue worker died while it ran; requeued it (rerun 1" in text
    outcome = json.loads(text[text.index("{\n"):text.rindex("}") + 1])
    assert outcome["rerun_points"] == [killed]
    rows = {r["experiment"]: r for r in outcome["points"]}
    assert set(rows) == {"wk-0", "wk-1"}
    for name, row in rows.items():
        assert (row["status"], row["reruns"]) == ("Success", int(name == killed)), row
        assert "evaluate" in row["stages_ran"] and row["ppl_averaged"] > 1, row
    status = run(DVC + ["queue", "status"], repo, run_env(session_tmp))
    assert "Running" not in status and "Queued" not in status, status
    # Nothing of the killed run is left: no process, no temporary copy of the repository.
    assert not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == "zombie"
    assert not list((repo / ".dvc" / "tmp" / "exps").glob("tmp*"))
