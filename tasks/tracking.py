"""MLflow tracking of pipeline executions: the only part of tasks/ that flows/ imports.

One pipeline execution = one MLflow parent run; every stage is a nested run under it. The flow
passes its parent run id in GRADPRUNE_PARENT_RUN_ID; under a plain `dvc repro` the stages find
the parent run by a tag holding the identity of the `dvc` process that launched them, so every
stage of one `dvc repro` lands under one parent.

Tracking changes no output: stages write their files whatever is logged here, which is why this
module is not a DVC dep of the stages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Iterator

import yaml

from gradprune.config import Params

PARENT_ENV = "GRADPRUNE_PARENT_RUN_ID"
# Set by DVC for the stages it runs: the repository root, and the experiment's name under
# `dvc exp run`.
DVC_ROOT_ENV = "DVC_ROOT"
DVC_EXP_NAME_ENV = "DVC_EXP_NAME"


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


def _dvc_ancestor() -> str | None:
    """'pid-starttime' of the nearest `dvc` process above this one, if any (Linux /proc)."""
    pid = os.getppid()
    while pid > 1:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = stat[stat.rindex(")") + 2:].split()
        if any(Path(a.decode(errors="replace")).name == "dvc" for a in argv[:3]):  # dvc, or python -m dvc
            return f"dvc-{pid}-{fields[19]}"
        pid = int(fields[1])
    return None


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
            "gradprune.execution": execution_key or f"{launcher}-{os.getpid()}-{time.time_ns()}"}
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


def finish_parent_run(run_id: str, params: Params, root: Path, status: str) -> None:
    from mlflow.tracking import MlflowClient

    configure_tracking(params, root)
    MlflowClient().set_terminated(run_id, status)


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
    """A stage's nested MLflow run: what a stage logs besides the files it writes."""

    def __init__(self, run_id: str, params: Params):
        import mlflow

        self.run_id = run_id
        self.params = params
        self._mlflow = mlflow

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path)

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        self._mlflow.log_artifacts(str(folder), artifact_path)

    def log_params(self, values: dict) -> None:
        """Params beyond params.yaml's that the stage learns as it starts (the device's name)."""
        self._mlflow.log_params(values)

    def log_metrics(self, metrics: dict, path: Path) -> None:
        """The numbers of a stage's metrics file, and the file itself."""
        self._mlflow.log_metrics({k: float(v) for k, v in _flatten(metrics).items()})
        self._mlflow.log_artifact(str(path), "metrics")

    def register_model(self, folder: Path, artifact_path: str = "model") -> int:
        """Log a Hugging Face model folder and register it as a new version of the
        configured registered model; returns the version number."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.log_artifacts(folder, artifact_path)
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


@contextlib.contextmanager
def stage_run(name: str, params: Params) -> Iterator[StageRun]:
    """Open the stage's nested run under the execution's parent run, with the params dvc.yaml
    declares for it. An exception fails both runs; a normal exit finishes them."""
    experiment_id = configure_tracking(params)
    import mlflow
    from mlflow.tracking import MlflowClient

    parent_id = _parent_run_for_stage(params, experiment_id)
    with mlflow.start_run(run_name=name, parent_run_id=parent_id, experiment_id=experiment_id,
                          tags={"gradprune.stage": name}) as active:
        flat = {}
        for key in stage_params_keys(name):
            if "." in key:
                flat[key] = params_value(params, key)
            else:
                flat.update(section_dict(params, key))
        mlflow.log_params(flat)
        try:
            yield StageRun(active.info.run_id, params)
        except BaseException:
            MlflowClient().set_terminated(parent_id, "FAILED")
            mlflow.end_run("FAILED")
            raise
    MlflowClient().set_terminated(parent_id, "FINISHED")


def _flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
            out[key] = v
    return out
