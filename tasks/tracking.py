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
# MLflow 3's UI opens an experiment in its GenAI view unless this experiment tag names the
# model-training kind (the values are the UI's own).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# The newest final model's alias in the registry: models:/<name>@champion.
CHAMPION = "champion"
# What the logged model's environment needs; giving it skips MLflow's requirement inference
# (about 4 s a model).
MODEL_REQUIREMENTS = ["torch", "transformers", "tokenizers", "safetensors"]
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
    experiment = mlflow.set_experiment(params.mlflow.experiment)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG,
                                                 EXPERIMENT_KIND)
    return experiment.experiment_id


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

    def log_params(self, values: dict) -> None:
        """Params beyond params.yaml's that the stage learns as it starts (the device's name)."""
        self._guard(lambda: self._mlflow.log_params(values))

    def log_metrics(self, metrics: dict, path: Path) -> None:
        """The numbers of a stage's metrics file, and the file itself."""
        def log_both() -> None:
            self._mlflow.log_metrics({k: float(v) for k, v in _flatten(metrics).items()})
            self._mlflow.log_artifact(str(path), "metrics")
        self._guard(log_both)

    def log_curve(self, rows: list[dict], prefix: str = "", series: str | None = None
                  ) -> int | None:
        """How many values `_log_curve` logged (None when the stage runs untracked)."""
        return self._guard(lambda: self._log_curve(rows, prefix, series))

    def _log_curve(self, rows: list[dict], prefix: str, series: str | None) -> int:
        """Per-step metrics from curve rows ({"step": s, "train_loss": ..., "val_loss": ...}),
        so MLflow charts draw curves: `<prefix><key>` at each row's step, or
        `<prefix>run<series value>/<key>` when `series` names a column that splits the rows
        into runs. Returns how many values were logged."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = []
        for row in rows:
            name = prefix if series is None else f"{prefix}run{row[series]}/"
            values += [Metric(f"{name}{k}", float(v), now, int(row["step"]))
                       for k, v in row.items()
                       if k not in ("step", series) and _is_number(v)]
        client = self._mlflow.MlflowClient()
        for start in range(0, len(values), 1000):  # MLflow's limit per batch
            client.log_batch(self.run_id, metrics=values[start:start + 1000])
        return len(values)

    def log_parent_metrics(self, metrics: dict) -> None:
        """Headline numbers on the execution's parent run: the row the runs table shows."""
        self._guard(lambda: self._log_parent_metrics(metrics))

    def _log_parent_metrics(self, metrics: dict) -> None:
        client = self._mlflow.MlflowClient()
        parent = client.get_run(self.run_id).data.tags["mlflow.parentRunId"]
        for key, value in _flatten(metrics).items():
            client.log_metric(parent, key, float(value))

    def register_model(self, folder: Path, artifact_path: str = "model",
                       description: str | None = None, tags: dict | None = None,
                       alias: str | None = CHAMPION) -> int | None:
        """Log a Hugging Face model folder as an MLflow model and register it as a new version
        of the configured registered model, with `description` (the model card), `tags` and
        `alias`; returns the version number (None when the stage runs untracked).

        A decoder LM is logged with the transformers flavor as a text-generation pipeline
        (signature, input example, the card): `mlflow.pyfunc.load_model("models:/<name>@<alias>")`
        and `mlflow models serve` take it. The encoder-decoder, which no transformers pipeline
        runs, is logged as plain files."""
        return self._guard(lambda: self._register_model(folder, artifact_path, description,
                                                        tags, alias))

    def _register_model(self, folder: Path, artifact_path: str, description: str | None,
                        tags: dict | None, alias: str | None) -> int:
        from gradprune.models.seq2seq import is_seq2seq_folder

        name = self.params.mlflow.registered_model
        _ensure_registered_model(self._mlflow.MlflowClient(), name)
        if is_seq2seq_folder(folder):
            version = self._register_folder(folder, artifact_path, name)
        else:
            version = log_text_generation_model(folder, artifact_path, name, description)
        set_version_metadata(name, version, description=description, tags=tags, alias=alias)
        return version

    def _register_folder(self, folder: Path, artifact_path: str, name: str) -> int:
        self.log_artifacts(folder, artifact_path)
        client = self._mlflow.MlflowClient()
        run = client.get_run(self.run_id)
        version = client.create_model_version(
            name, source=f"{run.info.artifact_uri}/{artifact_path}", run_id=self.run_id)
        return int(version.version)


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description=(
            "Pruned, fine-tuned and averaged model from the gradprune pipeline: "
            f"mlflow.pyfunc.load_model('models:/{name}@{CHAMPION}') generates text; the "
            "version's files load with AutoModelForCausalLM.from_pretrained."))
    except MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise


def text_generation_signature():
    """Prompts in, generated texts out, with the generation settings as inference params."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string")]),
                          outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec("max_new_tokens", "long", 32),
                                              ParamSpec("do_sample", "boolean", False)]))


def log_text_generation_model(folder: Path, artifact_path: str, registered_model: str,
                              card: str | None = None) -> int:
    """Log a decoder-LM folder in the active run with MLflow's transformers flavor (a
    text-generation pipeline, weights saved by save_pretrained: no pickle) and register it;
    returns the version number."""
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    model_card = None
    if card is not None:
        from huggingface_hub import ModelCard

        model_card = ModelCard(card)
    # The flavor looks up a license on the Hub by the model's name: nothing to find offline.
    offline = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        info = mlflow.transformers.log_model(
            generator, name=artifact_path, task="text-generation", model_card=model_card,
            signature=text_generation_signature(),
            input_example=(["The market opened"], {"max_new_tokens": 8}),
            pip_requirements=MODEL_REQUIREMENTS, registered_model_name=registered_model)
    finally:
        if offline is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = offline
    return int(info.registered_model_version)


def set_version_metadata(name: str, version: int, description: str | None = None,
                         tags: dict | None = None, alias: str | None = None) -> None:
    """Description (the model card), tags and alias of a registered model version."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if description is not None:
        client.update_model_version(name, str(version), description=description)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(name, str(version), key, str(value))
    if alias is not None:
        client.set_registered_model_alias(name, alias, str(version))


def source_tags(root: Path = Path(".")) -> dict[str, str]:
    """Where a model came from: the git commit of the repository (DVC_ROOT under
    `dvc exp run`) and the DVC experiment's name, when there is one."""
    import subprocess

    root = Path(os.environ.get(DVC_ROOT_ENV) or root)
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                          text=True)
    tags = {"git_commit": done.stdout.strip() if done.returncode == 0 else "unknown",
            "dvc_experiment": os.environ.get(DVC_EXP_NAME_ENV) or "workspace"}
    return tags


def tag_champion(params: Params, tags: dict, description: str | None = None) -> None:
    """Add tags (and a new description) to the version the champion alias names: the
    evaluate stage's measurements of the final model, known only after it is registered."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name = params.mlflow.registered_model
    try:
        version = MlflowClient().get_model_version_by_alias(name, CHAMPION).version
    except MlflowException:  # nothing registered yet (the average stage ran untracked)
        return
    set_version_metadata(name, int(version), description=description, tags=tags)


def link_prefect_flow_run(run_id: str, flow_run_id: str, url: str | None) -> None:
    """Tag an MLflow run with the Prefect flow run that launched it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    client.set_tag(run_id, "prefect.flow_run_id", flow_run_id)
    if url:
        client.set_tag(run_id, "prefect.flow_run_url", url)


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
            environment = root / "reports" / "environment" / f"{stage.replace('@', '/')}.json"
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
        elif _is_number(v):
            out[key] = v
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
