"""MLflow tracking of pipeline executions: the only part of tasks/ that flows/ imports.

One pipeline execution = one MLflow parent run; every stage is a nested run under it. The flow
passes its parent run id in GRADPRUNE_PARENT_RUN_ID; under a plain `dvc repro` the stages find
the parent run by a tag holding the identity of the `dvc` process that launched them, so every
stage of one `dvc repro` lands under one parent.

Tracking changes no output: stages write their files whatever is logged here, which is why this
module is not a DVC dep of the stages. Nor can it stop a stage: when the tracking store fails
(a server that went away), the stage warns, runs on untracked, and is listed in
mlflow-untracked.json; `gradprune track` logs those stages once the store is back. A run whose
process died (SIGKILL, a lost server) is marked KILLED by the next stage, never left RUNNING.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

import yaml

from gradprune.config import Params
from gradprune.io import read_json, write_json

log = logging.getLogger("gradprune.tracking")

PARENT_ENV = "GRADPRUNE_PARENT_RUN_ID"
# Set by DVC for the stages it runs: the repository root, and the experiment's name under
# `dvc exp run`.
DVC_ROOT_ENV = "DVC_ROOT"
DVC_EXP_NAME_ENV = "DVC_EXP_NAME"
# In the repository: the stages that ran while the tracking store was unreachable.
UNTRACKED = "mlflow-untracked.json"


def stage_params_keys(stage: str, dvc_file: Path = Path("dvc.yaml")) -> list[str]:
    """The params keys dvc.yaml declares for `stage` (`group@item` reads `group`): what this
    stage's nested run records."""
    stages = yaml.safe_load(dvc_file.read_text())["stages"]
    return [k for entry in stages[stage.split("@")[0]].get("params", []) for k in
            (entry if isinstance(entry, dict) else [entry])]


def params_value(params: Params, dotted: str):
    value = params
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def section_dict(params: Params, name: str) -> dict:
    """One section as a flat {"section.key": value} dict, for tracking."""
    value = getattr(params, name)
    if not dataclasses.is_dataclass(value):
        return {name: value}
    return {f"{name}.{k}": v for k, v in dataclasses.asdict(value).items()}


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (Linux), None for no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def _dvc_ancestor() -> str | None:
    """'pid-starttime' of the nearest `dvc` process above this one, if any (Linux /proc)."""
    pid = os.getppid()
    while pid > 1:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        fields = _proc_stat(pid)
        if fields is None:
            return None
        if any(Path(a.decode(errors="replace")).name == "dvc" for a in argv[:3]):  # dvc, or python -m dvc
            return f"dvc-{pid}-{fields[19]}"
        pid = int(fields[1])
    return None


def process_key(pid: int | None = None) -> str:
    """'host:pid:starttime' of a process: names it uniquely, even after its pid is reused."""
    pid = pid or os.getpid()
    fields = _proc_stat(pid)
    return f"{socket.gethostname()}:{pid}:{fields[19] if fields else '?'}"


def process_alive(key: str) -> bool:
    """Whether the process a process_key names still runs (always True on another host: only
    the host itself can tell)."""
    host, pid, start = key.rsplit(":", 2)
    if host != socket.gethostname():
        return True
    fields = _proc_stat(int(pid))
    return fields is not None and fields[19] == start


def _tracking_uri(params: Params, root: Path) -> str:
    # A DVC experiment runs in a temporary copy of the repository (dvc exp run --queue/--temp)
    # and names the repository itself in DVC_ROOT: its runs belong in that repository's store.
    root = Path(os.environ.get(DVC_ROOT_ENV) or root)
    return (params.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{root.resolve() / 'mlflow.db'}")


def configure_tracking(params: Params, root: Path = Path(".")) -> str:
    """Point MLflow at the configured store; returns the experiment id."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # A tracking server that went away costs a stage seconds, not MLflow's default of 7
    # retries with exponential backoff and 120 s timeouts (minutes per call).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    mlflow.set_tracking_uri(_tracking_uri(params, root))
    return mlflow.set_experiment(params.mlflow.experiment).experiment_id


def create_parent_run(params: Params, launcher: str, root: Path = Path("."),
                      overrides: dict | None = None, execution_key: str | None = None,
                      title: str | None = None) -> str:
    """A new parent run for one pipeline execution, holding every param and the overrides."""
    from mlflow.tracking import MlflowClient

    experiment_id = configure_tracking(params, root)
    client = MlflowClient()
    tags = {"gradprune.launcher": launcher,
            "gradprune.execution": execution_key or f"{launcher}-{os.getpid()}-{time.time_ns()}",
            # The process that ends this run: the `dvc` above the stages, else this one.
            "gradprune.process": process_key(int(execution_key.split("-")[1]))
            if execution_key and execution_key.startswith("dvc-") else process_key()}
    if os.environ.get(DVC_EXP_NAME_ENV):
        tags["gradprune.experiment"] = os.environ[DVC_EXP_NAME_ENV]
    if overrides:
        tags["gradprune.overrides"] = ", ".join(f"{k}={v}" for k, v in overrides.items())
    if title is None:
        title = (f"experiment {tags['gradprune.experiment']}" if "gradprune.experiment" in tags
                 else f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}")
    parent = client.create_run(experiment_id, tags=tags, run_name=title)
    flat = {k: v for section in (f.name for f in dataclasses.fields(params) if f.name != "mlflow")
            for k, v in section_dict(params, section).items()}
    flat.update({f"override.{k}": v for k, v in (overrides or {}).items()})
    for k, v in flat.items():
        client.log_param(parent.info.run_id, k, v)
    return parent.info.run_id


def finish_parent_run(run_id: str | None, params: Params, root: Path, status: str) -> None:
    """End a parent run; a store that is down only costs a warning (the run is then marked
    KILLED by the next stage or `gradprune track` that reaches it)."""
    from mlflow.tracking import MlflowClient

    if run_id is None:
        return
    try:
        configure_tracking(params, root)
        MlflowClient().set_terminated(run_id, status)
    except Exception as err:
        log.warning("tracking: could not end MLflow run %s (%s: %s)", run_id,
                    type(err).__name__, err)


def _parent_run_for_stage(params: Params, experiment_id: str) -> str:
    """The flow's parent run, else the one of the `dvc` process above us, else a new one."""
    from mlflow.tracking import MlflowClient

    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    key = _dvc_ancestor()
    if key:
        found = MlflowClient().search_runs(
            [experiment_id], filter_string=f"tags.`gradprune.execution` = '{key}'", max_results=1)
        if found:
            return found[0].info.run_id
    return create_parent_run(params, "dvc" if key else "standalone", execution_key=key)


class StageRun:
    """A stage's nested MLflow run: what a stage logs besides the files it writes.

    Every call is guarded: the first failure of the store (a server gone, a database that
    cannot be written) is reported once, the stage is listed in mlflow-untracked.json for
    `gradprune track`, and the stage runs on with tracking off."""

    def __init__(self, name: str, params: Params):
        import mlflow

        self.name = name
        self.params = params
        self.run_id: str | None = None
        self.parent_id: str | None = None
        self.lost = False
        self._mlflow = mlflow

    def _guard(self, action: Callable[[], object]):
        if self.lost:
            return None
        try:
            return action()
        except Exception as err:  # any store failure: HTTP, SQL, filesystem
            self._lose(err)
            return None

    def _lose(self, err: Exception) -> None:
        self.lost = True
        uri = _safe(lambda: self._mlflow.get_tracking_uri())
        log.warning("tracking: MLflow at %s failed (%s: %s); the stage goes on untracked and "
                    "writes its outputs as usual; `gradprune track` logs it once the store is "
                    "back", uri, type(err).__name__, str(err).splitlines()[0][:200] if str(err)
                    else "")
        # A disk that failed the store may fail this list too; the stage still goes on.
        _safe(lambda: record_untracked(self.name, self.run_id,
                                       f"{type(err).__name__}: {err}"[:300]))

    def open(self) -> None:
        """Start the nested run under the execution's parent, with the params dvc.yaml
        declares for the stage; first mark runs whose process died KILLED."""
        def start() -> None:
            experiment_id = configure_tracking(self.params)
            end_abandoned_runs(experiment_id)
            self.parent_id = _parent_run_for_stage(self.params, experiment_id)
            active = self._mlflow.start_run(
                run_name=self.name, parent_run_id=self.parent_id, experiment_id=experiment_id,
                tags={"gradprune.stage": self.name, "gradprune.process": process_key()})
            self.run_id = active.info.run_id
            self._mlflow.log_params(stage_params(self.name, self.params))
        self._guard(start)

    def close(self, status: str) -> None:
        """End the run and its parent. A run the lost store could not end stays RUNNING only
        until the next stage or `gradprune track` reaches the store: its process is gone
        then, and end_abandoned_runs marks it KILLED."""
        from mlflow.tracking import MlflowClient

        def end() -> None:
            self._mlflow.end_run(status)
            MlflowClient().set_terminated(self.parent_id, status)
        if self.run_id is not None:
            self._guard(end)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._guard(lambda: self._mlflow.log_artifact(str(path), artifact_path))

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        self._guard(lambda: self._mlflow.log_artifacts(str(folder), artifact_path))

    def log_metrics(self, metrics: dict, path: Path) -> None:
        """The numbers of a stage's metrics file, and the file itself."""
        def log_both() -> None:
            self._mlflow.log_metrics({k: float(v) for k, v in _flatten(metrics).items()})
            self._mlflow.log_artifact(str(path), "metrics")
        self._guard(log_both)

    def register_model(self, folder: Path, artifact_path: str = "model") -> int | None:
        """Log a Hugging Face model folder and register it as a new version of the
        configured registered model; returns the version number (None when untracked)."""
        return self._guard(lambda: self._register_model(folder, artifact_path))

    def _register_model(self, folder: Path, artifact_path: str) -> int:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._mlflow.log_artifacts(str(folder), artifact_path)
        client = MlflowClient()
        name = self.params.mlflow.registered_model
        try:
            client.create_registered_model(name, description=(
                "Pruned, fine-tuned and averaged model from the gradprune pipeline "
                "(Hugging Face format: load with AutoModelForCausalLM.from_pretrained)."))
        except MlflowException as err:
            if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
                raise
        run = client.get_run(self.run_id)
        version = client.create_model_version(
            name, source=f"{run.info.artifact_uri}/{artifact_path}", run_id=self.run_id)
        return int(version.version)


def _safe(action: Callable[[], object]):
    try:
        return action()
    except Exception:
        return None


def stage_params(name: str, params: Params, dvc_file: Path = Path("dvc.yaml")) -> dict:
    """The params a stage's run records: the keys dvc.yaml declares for it, flattened."""
    flat = {}
    for key in stage_params_keys(name, dvc_file):
        if "." in key:
            flat[key] = params_value(params, key)
        else:
            flat.update(section_dict(params, key))
    return flat


@contextlib.contextmanager
def stage_run(name: str, params: Params) -> Iterator[StageRun]:
    """The stage's nested run under the execution's parent run. An exception fails both runs;
    a normal exit finishes them. A failing store never stops the stage (StageRun)."""
    tracked = StageRun(name, params)
    tracked.open()
    try:
        yield tracked
    except BaseException:
        tracked.close("FAILED")
        raise
    tracked.close("FINISHED")


def end_abandoned_runs(experiment_id: str) -> list[str]:
    """Mark KILLED every RUNNING run of this host whose process is gone (killed stages, a
    store that was down when a stage ended): no run stays RUNNING forever. Returns their ids."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    running = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    ended = []
    for run in running:
        owner = run.data.tags.get("gradprune.process")
        if owner and not process_alive(owner):
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    return ended


def _untracked_file() -> Path:
    return Path(os.environ.get(DVC_ROOT_ENV) or ".") / UNTRACKED


def record_untracked(stage: str, run_id: str | None, reason: str) -> None:
    path = _untracked_file()
    pending = read_json(path) if path.is_file() else []
    pending = [p for p in pending if p["stage"] != stage]
    pending.append({"stage": stage, "run_id": run_id, "reason": reason,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    write_json(path, pending)


def track_untracked(params: Params, root: Path = Path(".")) -> list[str]:
    """`gradprune track`: log every stage of mlflow-untracked.json (its params, the numbers
    and file of its metrics and the versions beside them) under a new parent run tagged
    gradprune.backfill, and mark abandoned runs KILLED. Returns the stages logged."""
    import mlflow

    path = root / UNTRACKED
    pending = read_json(path) if path.is_file() else []
    experiment_id = configure_tracking(params, root)
    end_abandoned_runs(experiment_id)
    if not pending:
        return []
    parent = create_parent_run(params, "backfill", root, title=f"backfill {time.strftime('%Y-%m-%d %H:%M:%S')}")
    logged = []
    for entry in pending:
        stage = entry["stage"]
        metrics_file = root / "metrics" / f"{stage.replace('@', '/')}.json"
        with mlflow.start_run(run_name=stage, parent_run_id=parent, experiment_id=experiment_id,
                              tags={"gradprune.stage": stage, "gradprune.backfill": "true",
                                    "gradprune.untracked_because": entry["reason"]}):
            mlflow.log_params(stage_params(stage, params, root / "dvc.yaml"))
            if metrics_file.is_file():
                mlflow.log_metrics({k: float(v) for k, v in _flatten(read_json(metrics_file)).items()})
                mlflow.log_artifact(str(metrics_file), "metrics")
            environment = root / "metrics" / "environment" / f"{stage.replace('@', '/')}.json"
            if environment.is_file():
                mlflow.log_artifact(str(environment), "metrics")
        logged.append(stage)
    mlflow.tracking.MlflowClient().set_terminated(parent, "FINISHED")
    path.unlink()
    return logged


def _flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
            out[key] = v
    return out
