"""The whole DAG on the micro config: once through `dvc repro`, once through the Prefect flow.

Both run from scratch on the real packaged corpus; together they also check that two runs give
bit-identical masks and final weights, that DVC skips what did not change, and that MLflow holds
one parent run per execution with a nested run per stage.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import ROOT, make_micro_repo, run, run_env
from safetensors.torch import load_file

# Whole pipelines in subprocesses: the slow half of the suite.
pytestmark = pytest.mark.integration

STAGES = ["prepare", "train", "gradients", "masks", "compare", "finetune", "average", "evaluate"]
# The micro config's comparison rows: compare@<criterion>-<pattern>.
COMPARE_ROWS = ["compare@sparsegpt-2:4"]
NESTED_RUNS = sorted([s for s in STAGES if s != "compare"] + COMPARE_ROWS)
DVC = [sys.executable, "-m", "dvc"]


@pytest.fixture(scope="module")
def repro_repo(session_tmp):
    repo = make_micro_repo(session_tmp / "repro")
    # A progress line after every item of every long loop: the micro stages take seconds.
    env = {**run_env(session_tmp), "GRADPRUNE_PROGRESS_SECONDS": "0"}
    log = run(DVC + ["repro"], repo, env)
    return repo, env, log


@pytest.fixture(scope="module")
def flow_repo(session_tmp):
    repo = make_micro_repo(session_tmp / "flow")
    env = run_env(session_tmp)
    log = run([sys.executable, "-m", "flows", "run"], repo, env)
    return repo, env, log


def runs_by_parent(repo: Path) -> dict[str, list[dict]]:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("gradprune")
    runs = client.search_runs([experiment.experiment_id])
    parents = {r.info.run_id: [] for r in runs if "mlflow.parentRunId" not in r.data.tags}
    for r in runs:
        parent = r.data.tags.get("mlflow.parentRunId")
        if parent:
            parents[parent].append({"stage": r.info.run_name, "status": r.info.status,
                                    "params": r.data.params, "metrics": r.data.metrics})
    return parents


def assert_metrics_are_numbers(repo: Path) -> None:
    """DVC's metrics hold numbers only, each value once; the settings beside them are in the
    stage's record under reports/."""
    def leaves(tree):
        for value in tree.values():
            yield from leaves(value) if isinstance(value, dict) else [value]

    for path in (repo / "metrics").rglob("*.json"):
        metrics = json.loads(path.read_text())
        assert all(type(v) in (int, float) for v in leaves(metrics)), path
        assert (repo / "reports" / path.relative_to(repo / "metrics")).is_file()
    evaluate = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert "compare" not in evaluate and "criterion" not in evaluate
    assert json.loads((repo / "reports" / "masks.json").read_text())["criterion"] == "gradient"


def test_repro_runs_every_stage_and_hits_the_sparsity(repro_repo):
    repo, _, log = repro_repo
    for stage in [s for s in STAGES if s != "compare"] + COMPARE_ROWS:
        assert f"Running stage '{stage}'" in log
    masks = json.loads((repo / "metrics" / "masks.json").read_text())
    assert masks["sparsity_achieved"] == 0.5
    assert masks["kept"] * 2 == masks["prunable"]
    evaluate = json.loads((repo / "reports" / "evaluate.json").read_text())
    for model in ("pruned", "finetuned_last", "averaged"):
        assert 0.5 <= evaluate["models"][model]["sparsity"] < 0.51
        assert set(evaluate["models"][model]["tasks"]) == {
            "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa"}
    assert evaluate["models"]["dense"]["sparsity"] == 0.0
    assert (evaluate["context"], evaluate["stride"]) == (64, 32)
    row = json.loads((repo / "reports" / "compare" / "sparsegpt-2:4.json").read_text())
    for scored in (row, row["finetuned"]):  # before and after fine-tuning + averaging
        assert 0.5 <= scored["sparsity"] < 0.501
        assert scored["test_perplexity"] > 1
        assert set(scored["tasks"]) == set(evaluate["models"]["dense"]["tasks"])
    assert row["finetuned"]["checkpoints"] == 3
    assert_metrics_are_numbers(repo)
    # No silent stage: what each is doing and how far, in the log dvc repro captures.
    for line in ("[train] optimizer steps: 24/24 (100%)", "[gradients] calibration blocks: 8/8",
                 "[evaluate] scoring model 4 of 4: averaged", "[evaluate] log-likelihoods: ",
                 "[evaluate] perplexity windows: ", "[compare@sparsegpt-2:4] fine-tuning"):
        assert line in log, line
    for name in ("loss_curve.png", "layer_sparsity.png", "report.md", "report.html"):
        assert (repo / "data" / "evaluate" / name).stat().st_size > 0
    # every accuracy and perplexity has its interval; every row but dense its paired tests
    dense = evaluate["models"]["dense"]
    assert dense["perplexity_test_ci_low"] < dense["perplexity_test"] \
        < dense["perplexity_test_ci_high"]
    # a compare row's tests live in evaluate's record, which holds the dense model's questions
    row_tests = evaluate["compare_vs_dense"]["sparsegpt-2:4"]
    for name, scored in [*evaluate["models"].items(),
                         ("compare", {**row, "vs_dense": row_tests["pruned"]}),
                         ("compare fine-tuned", {**row["finetuned"],
                                                 "vs_dense": row_tests["finetuned"]})]:
        for task in scored["tasks"].values():
            assert task["acc_ci_low"] <= task["acc"] <= task["acc_ci_high"]
        assert ("vs_dense" in scored) == (name != "dense"), name
        if name != "dense":
            assert set(scored["vs_dense"]["tasks"]) == set(dense["tasks"])
            assert 0 <= scored["vs_dense"]["average"]["p_value"] <= 1
    table = pq.read_table(repo / "data" / "evaluate" / "questions.parquet").to_pylist()
    assert {r["model"] for r in table} == {"dense", "pruned", "finetuned_last", "averaged",
                                           "sparsegpt-2:4", "sparsegpt-2:4/finetuned"}
    assert len(table) == 6 * 7 * 2  # six rows x seven tasks x evaluate.limit questions


def test_second_repro_does_nothing(repro_repo):
    repo, env, _ = repro_repo
    log = run(DVC + ["repro"], repo, env)
    assert "Running stage" not in log
    assert "up to date" in run(DVC + ["status"], repo, env)


@pytest.mark.parametrize("module", ["gradprune/pruning/masks.py", "gradprune/models/llama.py",
                                    "tasks/measure.py", "gradprune/data.py",
                                    "gradprune/config/schema.py"])
def test_editing_a_module_makes_dvc_status_name_every_stage_that_imports_it(repro_repo, module):
    """The stage deps are the import closure: an edit anywhere a stage's code reaches is seen."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import stage_deps

    repo, env, _ = repro_repo
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    importers = {name for name, files in stage_deps.expected_code_deps(spec, repo).items()
                 if module in files}
    assert importers
    path = repo / module
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n# an edit\n")
        status = json.loads(run(DVC + ["status", "--json"], repo, env).strip().splitlines()[-1])
    finally:
        path.write_bytes(original)
    changed = {name.split("@")[0] for name in status}
    assert importers <= changed, f"{module}: dvc status missed {importers - changed}"
    assert "up to date" in run(DVC + ["status"], repo, env)


def test_repro_is_one_mlflow_parent_with_a_nested_run_per_stage(repro_repo):
    repo, _, _ = repro_repo
    parents = runs_by_parent(repo)
    assert len(parents) == 1
    (children,) = parents.values()
    assert sorted(c["stage"] for c in children) == NESTED_RUNS
    assert all(c["status"] == "FINISHED" for c in children)
    masks_run = next(c for c in children if c["stage"] == "masks")
    assert masks_run["params"]["masks.sparsity"] == "0.5"
    assert masks_run["metrics"]["sparsity_achieved"] == 0.5

    from mlflow.tracking import MlflowClient
    versions = MlflowClient().search_model_versions("name = 'gradprune-final'")
    assert len(versions) == 1


def assert_pruned_weights_stay_zero(repo: Path, checkpoints: int) -> dict:
    """Every masked weight is exactly zero in every fine-tuning checkpoint and the final model;
    returns the masks."""
    from gradprune.pruning.masks import load_masks

    masks = load_masks(repo / "data" / "masks" / "masks.safetensors")
    final = load_file(str(repo / "data" / "average" / "model" / "model.safetensors"))
    files = sorted((repo / "data" / "finetune").glob("ckpt-*.safetensors"))
    assert len(files) == checkpoints
    for state in [final] + [load_file(str(c)) for c in files]:
        kept_nonzero = kept = 0
        for name, mask in masks.items():
            weight = state[f"{name}.weight"]
            assert bool((weight[~mask] == 0).all()), name
            kept_nonzero += int((weight[mask] != 0).sum())
            kept += int(mask.sum())
        # The kept weights are still alive (a global criterion may empty a whole layer).
        assert kept_nonzero > 0.99 * kept
    return masks


def test_pruned_weights_stay_zero_through_finetune_and_average(repro_repo):
    repo, _, _ = repro_repo
    assert_pruned_weights_stay_zero(repo, checkpoints=3)


def test_flow_runs_the_same_dag_and_leaves_dvc_clean(flow_repo):
    repo, env, log = flow_repo
    outcome = json.loads(log[log.index("{"):log.rindex("}") + 1])
    assert outcome == {stage: "ran" for stage in STAGES}
    assert "up to date" in run(DVC + ["status"], repo, env)
    parents = runs_by_parent(repo)
    assert len(parents) == 1
    (children,) = parents.values()
    assert sorted(c["stage"] for c in children) == NESTED_RUNS
    # The MLflow parent run names the Prefect flow run that launched it.
    from mlflow.tracking import MlflowClient

    (parent_id,) = parents
    parent = MlflowClient().get_run(parent_id)
    assert len(parent.data.tags["prefect.flow_run_id"]) == 36  # a UUID
    assert parent.data.metrics["averaged.sparsity"] >= 0.5


def test_two_runs_from_scratch_are_bit_identical(repro_repo, flow_repo):
    a, _, _ = repro_repo
    b, _, _ = flow_repo
    for rel in ("data/masks/masks.safetensors", "data/average/model/model.safetensors",
                "data/train/model/model.safetensors", "data/prepare/train.parquet"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def files_under(root: Path, paths: list[str]) -> dict[str, str]:
    """{relative path: sha256} of every file in these files and folders."""
    files = {}
    for path in paths:
        top = root / path
        for file in sorted([top] if top.is_file() else top.rglob("*")):
            if file.is_file():
                files[str(file.relative_to(root))] = hashlib.sha256(file.read_bytes()).hexdigest()
    return files


def test_dvc_push_then_pull_restores_every_artifact_in_a_fresh_clone(repro_repo, tmp_path):
    repo, env, _ = repro_repo
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = sorted({out["path"] for stage in lock["stages"].values() for out in stage["outs"]})
    assert {"data/prepare", "data/train", "data/average", "metrics/evaluate.json"} <= set(outs)
    remote = tmp_path / "remote"
    # The committed default remote, pointed elsewhere for this clone only (.dvc/config.local).
    run(DVC + ["remote", "modify", "--local", "storage", "url", str(remote)], repo, env)
    # dvc.lock and the uncached metrics and plots travel through git, the data through DVC.
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    run(["git", "add", "-A"], repo, env)
    run(git + ["commit", "-qm", "pipeline results"], repo, env)
    run(DVC + ["push"], repo, env)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    assert not (clone / "data" / "train").exists()
    run(DVC + ["remote", "modify", "--local", "storage", "url", str(remote)], clone, env)
    run(DVC + ["pull"], clone, env)
    assert files_under(clone, outs) == files_under(repo, outs)
    assert len(files_under(repo, outs)) > 30
    assert "up to date" in run(DVC + ["status"], clone, env)
    assert "Running stage" not in run(DVC + ["repro"], clone, env)


def test_a_compare_row_fine_tunes_exactly_as_the_main_path(repro_repo):
    """The row with the main path's criterion, pattern and scope runs the same fine-tuning and
    averaging code from the same pruned weights, so its merge scores the final model's numbers."""
    repo, env, _ = repro_repo
    run(DVC + ["exp", "run", "compare@gradient-unstructured", "-S", "compare.criteria=[gradient]",
               "-S", "compare.patterns=[unstructured]"], repo, env)
    row = json.loads((repo / "reports" / "compare" / "gradient-unstructured.json").read_text())
    evaluate = json.loads((repo / "reports" / "evaluate.json").read_text())
    final = evaluate["models"]["averaged"]
    assert row["finetuned"]["test_perplexity"] == final["perplexity_test"]
    assert row["finetuned"]["tasks"] == final["tasks"]
    assert row["test_perplexity"] == evaluate["models"]["pruned"]["perplexity_test"]


def test_wikitext_is_scored_by_the_papers_protocol_in_evaluate_and_in_compare_rows(repro_repo,
                                                                                    session_tmp):
    """A user's WikiText-2 file (here: real English paragraphs standing in for it) is scored in
    non-overlapping windows for every model evaluate reports and every scoring of a compare row;
    the row with the main path's criterion and pattern holds the same models, so the same
    numbers. A record an earlier configuration left behind is in neither the report nor the
    results table."""
    from gradprune.data import ood_documents

    repo, env, _ = repro_repo
    text = session_tmp / "wiki.test.txt"
    text.write_text("\n\n".join(ood_documents("science")[:40]))
    run(DVC + ["exp", "run", "-S", f"evaluate.wikitext={text}", "-S",
               "evaluate.wikitext_context=64", "-S", "compare.criteria=[gradient]", "-S",
               "compare.patterns=[unstructured]"], repo, env)
    row = json.loads((repo / "reports" / "compare" / "gradient-unstructured.json").read_text())
    evaluate = json.loads((repo / "reports" / "evaluate.json").read_text())
    models = evaluate["models"]
    for name, model in models.items():
        assert model["perplexity_wikitext_ci_low"] < model["perplexity_wikitext"] \
            < model["perplexity_wikitext_ci_high"], name
    assert row["wikitext_perplexity"] == models["pruned"]["perplexity_wikitext"]
    assert row["finetuned"]["wikitext_perplexity"] == models["averaged"]["perplexity_wikitext"]
    assert models["pruned"]["perplexity_wikitext"] > models["dense"]["perplexity_wikitext"]
    assert "non-overlapping windows of 64 tokens" in evaluate["wikitext_protocol"]
    report = (repo / "data" / "evaluate" / "report.md").read_text()
    assert "WikiText-2 ppl" in report
    assert f"{row['wikitext_perplexity']:.2f} [" in report

    stale = {**row, "criterion": "magnitude", "pattern": "2:4"}
    (repo / "reports" / "compare" / "magnitude-2:4.json").write_text(json.dumps(stale))
    run(DVC + ["repro", "-f", "-s", "evaluate"], repo, env)
    report = (repo / "data" / "evaluate" / "report.md").read_text()
    assert "gradient unstructured (no fine-tuning)" in report
    assert "magnitude 2:4" not in report
    # docs/RESULTS.md's table, made by scripts/results_table.py from the same records
    table = run([sys.executable, str(ROOT / "scripts" / "results_table.py"), "--reports",
                 str(repo / "reports"), "--params", str(repo / "params.yaml")], ROOT, env)
    assert "magnitude, 2:4" not in table
    header = next(line for line in table.splitlines() if line.startswith("| model |"))
    assert "| test ppl (x dense) | WikiText-2 ppl (x dense) |" in header
    dense = models["dense"]["perplexity_wikitext"]
    gradient = next(line for line in table.splitlines()
                    if line.startswith("| gradient (global), unstructured |"))
    assert (f"{row['wikitext_perplexity']:.2f} [{row['wikitext_perplexity_ci_low']:.2f}, "
            f"{row['wikitext_perplexity_ci_high']:.2f}] "
            f"({row['wikitext_perplexity'] / dense:.2f}x)") in gradient
    # and the levers in turn: the fine-tuned row as multiples of dense, test / WikiText-2
    tuned = row["finetuned"]
    levers = next(line for line in table.splitlines()
                  if line.startswith("| gradient, unstructured |"))
    assert (f"| {tuned['test_perplexity'] / models['dense']['perplexity_test']:.2f}x / "
            f"{tuned['wikitext_perplexity'] / dense:.2f}x |") in levers
    assert f"{tuned['tokens']:,} tokens" in levers


# Last: it moves the repro workspace to another sparsity.
def test_changing_sparsity_reruns_only_masks_and_after(repro_repo):
    repo, env, _ = repro_repo
    log = run(DVC + ["exp", "run", "-S", "masks.sparsity=0.7"], repo, env)
    for stage in ("prepare", "train", "gradients"):
        assert f"Running stage '{stage}'" not in log
    for stage in ("masks", "finetune", "average", "evaluate"):
        assert f"Running stage '{stage}'" in log
    masks = json.loads((repo / "metrics" / "masks.json").read_text())
    assert masks["sparsity_asked"] == 0.7
    assert abs(masks["sparsity_achieved"] - 0.7) <= 1 / masks["prunable"]


# --- the same DAG with the encoder-decoder ----------------------------------------------------

# One layer per stack and fewer test examples keep it as fast as the decoder's DAG.
SEQ2SEQ = {"model": {"arch": "seq2seq", "layers": 1},
           "gradients": {"include": ["encoder.layers.*", "decoder.layers.*"]},
           "evaluate": {"max_tokens": 256, "exact_match_limit": 8},
           # Zero-shot tasks do not apply; fine-tuned compare rows are the decoder DAG's to test.
           "compare": {"zeroshot": False, "finetune": False}}


def test_seq2seq_runs_the_same_dag(session_tmp):
    from gradprune.models.llama import load_model, summed_loss
    from gradprune.models.seq2seq import Seq2SeqTransformer

    repo = make_micro_repo(session_tmp / "seq2seq", SEQ2SEQ)
    log = run(DVC + ["repro"], repo, run_env(session_tmp))
    for stage in [s for s in STAGES if s != "compare"] + COMPARE_ROWS:
        assert f"Running stage '{stage}'" in log
    (children,) = runs_by_parent(repo).values()
    assert sorted(c["stage"] for c in children) == NESTED_RUNS

    prepared = json.loads((repo / "reports" / "prepare.json").read_text())["task"]
    assert prepared["source_length"] + prepared["target_length"] == 64 + 2 * prepared["spans"] + 2
    masks = json.loads((repo / "metrics" / "masks.json").read_text())
    assert masks["sparsity_achieved"] == 0.5 and masks["kept"] * 2 == masks["prunable"]
    names = assert_pruned_weights_stay_zero(repo, checkpoints=3)
    for part in ("encoder.layers.0.self_attn.q_proj", "decoder.layers.0.self_attn.out_proj",
                 "decoder.layers.0.multihead_attn.k_proj", "encoder.layers.0.linear1",
                 "decoder.layers.0.linear2"):
        assert part in names

    evaluate = json.loads((repo / "reports" / "evaluate.json").read_text())
    assert evaluate["arch"] == "seq2seq" and evaluate["speed"] == {} and evaluate["tasks"] == []
    for name, row in evaluate["models"].items():
        assert row["perplexity_test"] > 1 and 0 <= row["exact_match"] <= 1
        assert row["exact_match_examples"] == 8 and row["tasks"] == {}
        assert row["sparsity"] == (0.0 if name == "dense" else 0.5)
    row = json.loads((repo / "reports" / "compare" / "sparsegpt-2:4.json").read_text())
    assert row["sparsity"] == 0.5 and row["test_perplexity"] > 1
    report = (repo / "data" / "evaluate" / "report.md").read_text()
    assert "| exact match |" in report and "Not run for an encoder-decoder" in report

    final = load_model(repo / "data" / "average" / "model")
    assert isinstance(final, Seq2SeqTransformer)
    from gradprune.data import read_blocks
    test = read_blocks(repo / "data" / "prepare" / "test.parquet")[:4]
    loss, tokens = summed_loss(final, test, bf16=False)
    assert tokens == 4 * prepared["target_length"] and torch.isfinite(loss)
