"""MLflow done the MLflow way, on a SQLite store in a temporary folder: the final model is a real
MLflow model that pyfunc loads from the registry by its alias and that generates text; the
version carries the card and tags; losses are logged per step; the parent run carries the
headline numbers; the experiment opens in the model-training view."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from conftest import tiny_llama_folder

from gradprune.config import Params
from gradprune.config.schema import MlflowParams
from gradprune.export.card import front_matter

CARD = "---\nlibrary_name: transformers\npipeline_tag: text-generation\n---\n\n# tiny\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module: creating its tables takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture()
def tracked(store, request, monkeypatch):
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # stage_run reads dvc.yaml for the params a stage records.
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.delenv("GRADPRUNE_PARENT_RUN_ID", raising=False)
    # An experiment and a registered model of the test's own in the shared store.
    name = request.node.name[:40]
    return Params(mlflow=MlflowParams(tracking_uri=store, experiment=f"t-{name}",
                                      registered_model=f"tiny-{name}"))


def tiny_model_folder(folder: Path, seed: int = 0) -> Path:
    return tiny_llama_folder(folder, seed, card=CARD)


# About 30 s (two models logged, registered and loaded): outside the fast unit part.
@pytest.mark.integration
def test_final_model_loads_from_the_registry_by_alias_and_generates(tracked, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.tracking import stage_run

    first, second = tiny_model_folder(tmp_path / "a", 0), tiny_model_folder(tmp_path / "b", 1)
    with stage_run("average", tracked) as run:
        assert run.register_model(first, description=CARD, tags={"criterion": "wanda"}) == 1
    with stage_run("average", tracked) as run:
        assert run.register_model(second, description=CARD,
                                  tags={"criterion": "magnitude", "sparsity": 0.5}) == 2

    client = MlflowClient()
    name = tracked.mlflow.registered_model
    champion = client.get_model_version_by_alias(name, "champion")
    assert int(champion.version) == 2  # the newest final model
    assert champion.description == CARD
    assert "pyfunc.load_model" in client.get_registered_model(name).description
    assert champion.tags == {"criterion": "magnitude", "sparsity": "0.5"}
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    schema = model.metadata.get_input_schema()
    assert [c.type.name for c in schema.inputs] == ["string"]
    assert {p.name for p in model.metadata.get_params_schema().params} == {"max_new_tokens",
                                                                           "do_sample"}
    out = model.predict(["the market"], params={"max_new_tokens": 3})
    assert len(out) == 1 and out[0].startswith("the market")
    # The logged model appears in the run's Models column.
    experiment = client.get_experiment_by_name(tracked.mlflow.experiment).experiment_id
    assert len(client.search_logged_models([experiment])) == 2


def test_losses_are_logged_per_step_and_headline_metrics_on_the_parent(tracked):
    from mlflow.tracking import MlflowClient

    from tasks.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, stage_run

    rows = [{"step": s, "train_loss": 5.0 - s / 10, "val_loss": 4.0 if s % 2 == 0 else None,
             "lr": 1e-3} for s in range(1, 6)]
    runs = [{"run": r, **row} for r in (0, 1) for row in rows[:3]]
    with stage_run("finetune", tracked) as run:
        assert run.log_curve(rows) == 5 + 2 + 5
        assert run.log_curve(runs, prefix="ft/", series="run") == 2 * (3 + 1 + 3)
        run.log_parent_metrics({"averaged": {"perplexity_test": 12.5}, "method": "greedy"})
        run_id = run.run_id
    client = MlflowClient()
    history = client.get_metric_history(run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5]
    assert [m.value for m in history] == pytest.approx([4.9, 4.8, 4.7, 4.6, 4.5])
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [2, 4]
    assert [m.step for m in client.get_metric_history(run_id, "ft/run1/train_loss")] == [1, 2, 3]
    parent = client.get_run(client.get_run(run_id).data.tags["mlflow.parentRunId"])
    assert parent.data.metrics == {"averaged.perplexity_test": 12.5}
    experiment = client.get_experiment_by_name(tracked.mlflow.experiment)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_model_folder_has_a_card_and_the_tokenizer_knows_the_context(tmp_path):
    from transformers import AutoTokenizer

    folder = tiny_model_folder(tmp_path / "m")
    assert front_matter((folder / "README.md").read_text())["pipeline_tag"] == "text-generation"
    assert AutoTokenizer.from_pretrained(folder).model_max_length == 32


@pytest.mark.integration
def test_flow_run_and_mlflow_run_name_each_other(tracked, tmp_path, monkeypatch):
    """The flow run is renamed after the MLflow experiment and tagged with the parent run;
    the parent run is tagged with the flow run's id (Prefect's test harness: a real engine)."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    from mlflow.tracking import MlflowClient
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import link_flow_run_and_mlflow
    from tasks.tracking import create_parent_run

    parent_id = create_parent_run(tracked, "prefect")

    @flow(name="link-check")
    def linked() -> str:
        from prefect.runtime import flow_run

        link_flow_run_and_mlflow(parent_id, tracked.mlflow.experiment)
        return flow_run.get_id()

    with prefect_test_harness(server_startup_timeout=90):
        flow_run_id = linked()
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run_id)
    experiment = tracked.mlflow.experiment
    assert run.name.startswith(f"{experiment}-")
    assert f"mlflow-run:{parent_id}" in run.tags and f"mlflow-experiment:{experiment}" in run.tags
    assert MlflowClient().get_run(parent_id).data.tags["prefect.flow_run_id"] == flow_run_id
