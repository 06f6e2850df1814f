"""Scheduling on a real Prefect server, tracking on a real MLflow server.

A module starts `prefect server start` and `mlflow server` on free 127.0.0.1 ports with private
homes, deploys the pipeline flow of a micro repository twice (to a process work pool run by
`prefect worker start`, and with `serve`), triggers each deployment as a user would, and
checks that the flow run completed, the stages' outputs are there and their MLflow runs
reached the server. Every process a test starts, with everything it spawned, is stopped by
PID (the worker or serve before the servers), whether the test passes or fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, make_micro_repo, run, run_env

# Whole pipelines in subprocesses: the slow half of the suite.
pytestmark = pytest.mark.integration

DVC = [sys.executable, "-m", "dvc"]
FLOWS = [sys.executable, "-m", "flows"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None):
    """The JSON (or text) answer to a GET (or a POST of body), or None while nothing answers
    or the answer is an error."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def descendants(pid: int) -> list[int]:
    """Every living process below pid (from /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(0), []):
            found.append(child)
            pending.append(child)
    return found


def stop(proc: subprocess.Popen, grace: float) -> None:
    """Stop a process started in its own session and everything it spawned: flow runs start
    their own process groups, so signal every group in the tree (all of them ours), SIGTERM
    first, SIGKILL after `grace` seconds."""
    groups = set()
    for pid in [proc.pid, *descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(pid))

    def signal_all(signum: int) -> None:
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signum)

    signal_all(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    signal_all(signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def running(cmd: list[str], cwd: Path, env: dict[str, str], log: Path, grace: float = 15):
    """A long-running command in its own session, logging to `log`, stopped on exit."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc, grace)


def wait_for(what: str, check, proc: subprocess.Popen, log: Path, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        if proc.poll() is not None:
            pytest.fail(f"{what}: the process exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A Prefect server and an MLflow server (SQLite backend, its own artifact store) on
    127.0.0.1: yields their addresses, the artifact store and an environment pointing Prefect
    at the server."""
    tmp = tmp_path_factory.mktemp("servers")
    env = run_env(tmp)  # PREFECT_HOME under tmp: the server's database is private
    # Workers and `serve` poll for work every 10 s (15 s) by default; a test need not wait.
    env.update(PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_RUNNER_POLL_FREQUENCY="1")
    with contextlib.ExitStack() as stack:
        prefect_port, mlflow_port = free_port(), free_port()
        mlflow_log = tmp / "mlflow-server.log"
        mlflow = stack.enter_context(running(
            ["mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
             "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
             "--artifacts-destination", str(tmp / "mlartifacts"), "--workers", "1"],
            tmp, {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, mlflow_log))
        prefect_log = tmp / "prefect-server.log"
        prefect = stack.enter_context(running(
            ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            tmp, env, prefect_log))
        api = f"http://127.0.0.1:{prefect_port}/api"
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        wait_for("prefect server", lambda: http_json(f"{api}/health") is True, prefect, prefect_log)
        wait_for("mlflow server", lambda: http_json(f"{mlflow_url}/health") == "OK", mlflow,
                 mlflow_log)
        yield SimpleNamespace(env={**env, "PREFECT_API_URL": api}, api=api, mlflow=mlflow_url,
                              artifacts=tmp / "mlartifacts")
        # ExitStack stops the Prefect server, then the MLflow server.


def trigger_and_watch(deployment: dict, repo: Path, env: dict[str, str], api: str) -> dict:
    """`prefect deployment run --watch`, as a user would; returns that flow run as the server
    records it (the cron schedule's upcoming runs are `auto_scheduled`)."""
    run(["prefect", "deployment", "run", f"gradprune-pipeline/{deployment['name']}", "--watch",
         "--watch-interval", "1", "--watch-timeout", "240"], repo, env, timeout=300)
    runs = http_json(f"{api}/flow_runs/filter",
                     {"deployments": {"id": {"any_": [deployment["id"]]}}})
    (triggered,) = [r for r in runs if not r["auto_scheduled"]]
    return triggered


def tracked_stages(servers: SimpleNamespace, experiment: str) -> dict[str, str]:
    """{nested run name: status} under the experiment's one parent run on the MLflow server,
    whose artifacts (each stage's metrics file) are in the server's artifact store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=servers.mlflow)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["gradprune.launcher"] == "prefect"
    assert parents[0].info.status == "FINISHED"
    stages = {r.info.run_name: r.info.status for r in runs
              if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    for run_ in runs:
        if run_.info.run_name in stages:
            assert list(servers.artifacts.rglob(f"{run_.info.run_id}/artifacts/metrics/*.json"))
    return stages


def test_deployment_on_a_process_work_pool_runs_on_a_worker(servers, tmp_path):
    api = servers.api
    repo = make_micro_repo(tmp_path / "repo", {"mlflow": {"experiment": "deployed"}})
    # The environment route to the tracking server: params leave mlflow.tracking_uri null.
    env = {**servers.env, "MLFLOW_TRACKING_URI": servers.mlflow}
    run(FLOWS + ["deploy", "--pool", "test-pool", "--name", "nightly", "--cron", "0 3 * * *",
                 "--stage", "train"], repo, env)
    deployment = http_json(f"{api}/deployments/name/gradprune-pipeline/nightly")
    assert deployment["work_pool_name"] == "test-pool"
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
    assert deployment["parameters"] == {"overrides": None, "repo": str(repo), "stages": ["train"]}
    assert deployment["global_concurrency_limit"]["limit"] == 1
    assert http_json(f"{api}/work_pools/test-pool")["type"] == "process"

    # A worker asked to stop leaves its poll loop at once, then took over 30 s here to exit.
    with running(["prefect", "worker", "start", "--pool", "test-pool"], repo, env,
                 tmp_path / "worker.log", grace=3):
        flow_run = trigger_and_watch(deployment, repo, env, api)
    assert flow_run["state"]["type"] == "COMPLETED"
    # train and what it depends on, nothing after it
    assert (repo / "data" / "train" / "model" / "model.safetensors").stat().st_size > 0
    assert not (repo / "data" / "gradients").exists()
    assert "up to date" in run(DVC + ["status", "--with-deps", "train"], repo, env)
    assert tracked_stages(servers, "deployed") == {"prepare": "FINISHED", "train": "FINISHED"}
    assert not (repo / "mlflow.db").exists()


def test_served_flow_runs_a_triggered_run(servers, tmp_path):
    env, api = servers.env, servers.api
    # The params route to the tracking server; the environment names none.
    repo = make_micro_repo(tmp_path / "repo", {"mlflow": {"experiment": "served",
                                                          "tracking_uri": servers.mlflow}})
    log = tmp_path / "serve.log"
    with running(FLOWS + ["serve", "--name", "served", "--cron", "30 2 * * *",
                          "--stage", "prepare"], repo, env, log) as serve:
        deployment = wait_for("serve registers its deployment", lambda: http_json(
            f"{api}/deployments/name/gradprune-pipeline/served"), serve, log, timeout=90)
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["30 2 * * *"]
        flow_run = trigger_and_watch(deployment, repo, env, api)
    assert flow_run["state"]["type"] == "COMPLETED"
    assert (repo / "data" / "prepare" / "train.parquet").stat().st_size > 0
    assert not (repo / "data" / "train").exists()
    assert tracked_stages(servers, "served") == {"prepare": "FINISHED"}
    assert not (repo / "mlflow.db").exists()


@pytest.mark.parametrize("args, message", [
    (["serve", "--cron", "every night"], "--cron 'every night': not a cron expression"),
    (["deploy", "--pool", "p", "--stage", "trian"], "unknown stage 'trian': dvc.yaml has prepare"),
    (["serve", "--set", "masks.sparsity=1.5"], "params: masks.sparsity: must be in [0, 1)"),
    (["deploy", "--pool", "p", "--set", "masks.sparsity"], "written key.path=value"),
    (["serve"], "scheduling needs a Prefect server: start one with `prefect server start"),
])
def test_bad_schedule_input_is_refused_before_anything_is_deployed(args, message, monkeypatch,
                                                                    capsys):
    from flows.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(args + ["--repo", str(ROOT)])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_target_stage_runs_with_what_it_depends_on_in_dependency_order():
    from flows.dag import stage_graph, topological_order

    graph = stage_graph(ROOT / "dvc.yaml")
    assert topological_order(graph) == ["prepare", "train", "gradients", "masks", "compare",
                                        "finetune", "average", "evaluate"]
    assert topological_order(graph, ["masks"]) == ["prepare", "train", "gradients", "masks"]
    assert topological_order(graph, ["compare", "train"]) == ["prepare", "train", "gradients",
                                                              "compare"]
    with pytest.raises(ValueError, match="unknown stage 'trian': dvc.yaml has prepare, train"):
        topological_order(graph, ["trian"])


def stage_processes() -> dict[str, set[int]]:
    """{stage: pids} of the `dvc repro --single-item STAGE` processes running now."""
    import psutil

    found: dict[str, set[int]] = {}
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmd = process.info["cmdline"] or []
        if "--single-item" in cmd and "repro" in cmd:
            found.setdefault(cmd[cmd.index("--single-item") + 1], set()).add(process.info["pid"])
    return found


OUTAGE_SECONDS = 70


def test_a_served_run_survives_a_prefect_server_restart_during_a_stage(tmp_path):
    """Kill the Prefect server while a deployed flow run's train stage runs, start it again on
    the same port and database: the flow run ends Completed (or Failed, then its retry
    Completed), and no stage ever runs twice at once. The server stays down for longer than
    the Prefect client retries by default."""
    env = run_env(tmp_path)
    env["PREFECT_RUNNER_POLL_FREQUENCY"] = "1"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env["PREFECT_API_URL"] = api
    server_cmd = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    repo = make_micro_repo(tmp_path / "repo")
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(running(server_cmd, tmp_path, env,
                                             tmp_path / "server-1.log"))
        wait_for("prefect server", lambda: http_json(f"{api}/health") is True, server,
                 tmp_path / "server-1.log")
        serve_log = tmp_path / "serve.log"
        serve = stack.enter_context(running(FLOWS + ["serve", "--name", "outage", "--stage",
                                                     "train"], repo, env, serve_log))
        wait_for("serve registers its deployment", lambda: http_json(
            f"{api}/deployments/name/gradprune-pipeline/outage"), serve, serve_log, timeout=90)
        run(["prefect", "deployment", "run", "gradprune-pipeline/outage"], repo, env)
        (flow_run,) = http_json(f"{api}/flow_runs/filter", {})
        at_once: dict[str, int] = {}
        seen: dict[str, set[int]] = {}

        def watch() -> dict[str, set[int]]:
            now = stage_processes()
            for stage, pids in now.items():
                at_once[stage] = max(at_once.get(stage, 0), len(pids))
                seen.setdefault(stage, set()).update(pids)
            return now

        wait_for("the train stage starts", lambda: "train" in watch(), serve, serve_log,
                 timeout=300)
        stop(server, grace=0)  # SIGTERM then SIGKILL at once
        killed_at = time.monotonic()
        # Down until the stage has ended (its task reports Completed to no server) and longer
        # than the Prefect client's default retries (5, 2 to 32 s apart: 62 s).
        wait_for("the train stage ends", lambda: "train" not in watch()
                 and time.monotonic() - killed_at > OUTAGE_SECONDS, serve, serve_log,
                 timeout=300)
        server = stack.enter_context(running(server_cmd, tmp_path, env,
                                             tmp_path / "server-2.log"))
        wait_for("prefect server again", lambda: watch() is not None and http_json(
            f"{api}/health") is True, server, tmp_path / "server-2.log")
        restarted_after = time.monotonic() - killed_at

        def final():
            watch()
            state = (http_json(f"{api}/flow_runs/{flow_run['id']}") or {}).get("state") or {}
            return state if state.get("type") in ("COMPLETED", "FAILED", "CRASHED",
                                                  "CANCELLED") else None

        state = wait_for("the flow run ends", final, serve, serve_log, timeout=400)
        tasks = http_json(f"{api}/task_runs/filter",
                          {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
        # serve still takes runs from the restarted server: the next one completes.
        run(["prefect", "deployment", "run", "gradprune-pipeline/outage", "--watch",
             "--watch-interval", "1", "--watch-timeout", "120"], repo, env, timeout=180)
    print(f"server down for {restarted_after:.0f} s; flow run {state['type']}; stage "
          f"processes {seen}; task runs {[(t['name'], t['state_type']) for t in tasks]}")
    assert state["type"] == "COMPLETED", (state, serve_log.read_text()[-3000:])
    assert at_once == {"prepare": 1, "train": 1}, at_once
    assert sorted((t["name"], t["state_type"]) for t in tasks) == [
        ("prepare", "COMPLETED"), ("train", "COMPLETED")]
    # train's Completed event either reached the server on a client retry or, sent while it
    # was down, was lost and the flow settled it, saying so in its log.
    settled = "did not reach the server" in (
        {t["name"]: t for t in tasks}["train"]["state"]["message"] or "")
    assert settled == ("marked task runs train Completed on the server" in serve_log.read_text())
    assert (repo / "data" / "train" / "model" / "model.safetensors").stat().st_size > 0
    assert "up to date" in run(DVC + ["status", "--with-deps", "train"], repo, env)
