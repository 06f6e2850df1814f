"""The gradprune pipeline as a Prefect flow: every stage of dvc.yaml, run through DVC.

Each stage is a Prefect task that calls `dvc repro --single-item <stage>` in the stage graph's
order, so DVC decides what is stale, caches the outputs and updates dvc.lock: after the flow,
`dvc status` has nothing to do and the artifacts are the ones `dvc repro` makes. With
PREFECT_API_URL unset the flow runs against a temporary local server; set it to schedule and
observe runs on a Prefect server (`gradprune serve` / `gradprune deploy`, docs/SCALE.md).
`stages` narrows a run to those stages and what they depend on, as `dvc repro <stage>` does.

Overrides are dotted params keys (`{"masks.sparsity": 0.7}`), written into params.yaml (as
`dvc exp run -S` does, comments kept) after validation, and recorded as the flow run's
parameters and on the MLflow parent run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.dag import stage_graph, topological_order
from gradprune.config import apply_overrides, load_params, read_params_file, set_dotted
from gradprune.io import atomic_file
from tasks.artifacts import check_pipeline
from tasks.tracking import PARENT_ENV, create_parent_run, finish_parent_run, link_prefect_flow_run


def write_overrides(params_file: Path, overrides: dict[str, Any]) -> None:
    """Validate the overrides against the whole params file, then set them in place."""
    from ruamel.yaml import YAML

    apply_overrides(read_params_file(params_file), overrides)  # raises ParamError, writes nothing
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(params_file.read_text())
    for dotted, value in overrides.items():
        set_dotted(doc, dotted, value)
    with atomic_file(params_file) as tmp, open(tmp, "w") as f:
        rt.dump(doc, f)


def stage_environment(parent_run_id: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if parent_run_id is not None:
        env[PARENT_ENV] = parent_run_id
    env.setdefault("DVC_NO_ANALYTICS", "1")
    # The stages' `python` must be this interpreter, with this environment's packages.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@task(name="stage", task_run_name="{stage}")
def run_stage(stage: str, parent_run_id: str | None, repo: str) -> str:
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    done = subprocess.run(cmd, cwd=repo, env=stage_environment(parent_run_id),
                          capture_output=True, text=True)
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise RuntimeError(f"stage {stage} failed (exit {done.returncode}):\n{output[-4000:]}")
    # A matrix stage runs as stage@item, one per item.
    ran = f"Running stage '{stage}'" in output or f"Running stage '{stage}@" in output
    logger.info("stage %s: %s", stage, "ran" if ran else "up to date, skipped by DVC")
    return "ran" if ran else "skipped"


def link_flow_run_and_mlflow(parent_run_id: str, experiment: str) -> None:
    """Cross-reference the running flow run and the MLflow parent run: the MLflow run gets
    the flow run's id and UI address, the flow run is named after the MLflow experiment and
    tagged with the MLflow run's id."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_UI_URL

    flow_run_id = flow_run.get_id()
    if flow_run_id is None:  # called through pipeline.fn: no flow run
        return
    ui = PREFECT_UI_URL.value()
    link_prefect_flow_run(parent_run_id, flow_run_id,
                          f"{ui}/flow-runs/flow-run/{flow_run_id}" if ui else None)
    with get_client(sync_client=True) as client:
        client.update_flow_run(
            flow_run_id, name=f"{experiment}-{flow_run.get_name()}",
            tags=[*flow_run.get_tags(), f"mlflow-experiment:{experiment}",
                  f"mlflow-run:{parent_run_id}"])


def settle_task_runs() -> list[str]:
    """Mark Completed, on the server, the task runs of this flow run that it does not show
    final; returns their names. Called once every stage has returned: a task run reports its
    states as events, and those sent while the Prefect server was unreachable (a restart) are
    dropped, so a stage that finished then stays Running there for ever."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.runtime import flow_run
    from prefect.states import Completed

    flow_run_id = flow_run.get_id()
    if flow_run_id is None:  # called through pipeline.fn: no flow run
        return []
    only_this_run = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    with get_client(sync_client=True) as client:
        # The last stage's Completed event is usually still on its way: give it 5 s.
        deadline = time.monotonic() + 5
        while True:
            open_runs = [t for t in client.read_task_runs(flow_run_filter=only_this_run)
                         if t.state is None or not t.state.is_final()]
            if not open_runs or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for task_run in open_runs:
            client.set_task_run_state(task_run.id, Completed(
                message="the stage returned; its final state did not reach the server"),
                force=True)
    return [t.name for t in open_runs]


@flow(name="gradprune-pipeline", log_prints=True)
def pipeline(overrides: dict[str, Any] | None = None, repo: str = ".",
             stages: list[str] | None = None) -> dict[str, str]:
    """Run the dvc.yaml stages in dependency order: all of them, or only `stages` and what
    they depend on (as `dvc repro <stage>`); returns {stage: "ran" | "skipped"}."""
    root = Path(repo).resolve()
    params_file = root / "params.yaml"
    order = topological_order(stage_graph(root / "dvc.yaml"), stages)
    if overrides:
        write_overrides(params_file, overrides)
    # Before any stage: `dvc repro` removes a stage's outputs before the stage can refuse.
    problems = check_pipeline(root, order)
    if problems:
        raise ValueError("gradprune check failed, nothing was run:\n" + "\n".join(problems))
    params = load_params(params_file)
    try:
        parent_id = create_parent_run(params, launcher="prefect", root=root,
                                      overrides=overrides or {})
    except Exception as err:  # the tracking store is down: the pipeline runs untracked
        get_run_logger().warning("tracking: no MLflow parent run (%s: %s); the stages run and "
                                 "list themselves for `gradprune track`", type(err).__name__, err)
        parent_id = None
    if parent_id is not None:
        link_flow_run_and_mlflow(parent_id, params.mlflow.experiment)
    outcome: dict[str, str] = {}
    try:
        for stage in order:
            outcome[stage] = run_stage(stage, parent_id, str(root))
    except BaseException:
        finish_parent_run(parent_id, params, root, "FAILED")
        raise
    finish_parent_run(parent_id, params, root, "FINISHED")
    settled = settle_task_runs()
    if settled:
        get_run_logger().warning("marked task runs %s Completed on the server: their final "
                                 "states were lost while it was unreachable", ", ".join(settled))
    return outcome
