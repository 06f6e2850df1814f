"""Corrupt artifacts: every read names the file and how to get a good copy (the stage that
writes it, or the params key that points to it), and `gradprune check` finds each one in
milliseconds, before `dvc repro` removes any output."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, micro_params, record_refusal
from safetensors.torch import save_file
from test_model_sources import save_hf_checkpoint

from gradprune.data import load_tokenizer, read_blocks, write_blocks
from gradprune.io import ArtifactError, check_artifact, read_json
from gradprune.models.llama import load_model
from gradprune.models.sources import load_gguf_model, load_source_model
from gradprune.training.averaging import average_checkpoints
from gradprune.training.loop import load_train_state
from tasks.artifacts import artifact_remedy, check_pipeline, recovery_note, writer_of


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    save_hf_checkpoint(tmp_path / "ckpt", kv_heads=2)
    return tmp_path / "ckpt"


def test_truncated_model_weights_name_the_folder(checkpoint):
    truncate(checkpoint / "model.safetensors")
    for load in (load_model, lambda p: load_source_model(str(p))):
        with pytest.raises(ArtifactError) as info:
            load(checkpoint)
        assert info.value.path == checkpoint
        assert str(info.value).startswith(f"{checkpoint}: unreadable model folder (")
    record_refusal("truncated model.safetensors in a model folder (model.source or a stage's)",
                   str(info.value))


def test_garbage_model_weights_name_the_folder(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ArtifactError, match=f"^{checkpoint}: unreadable model folder"):
        load_model(checkpoint)


def test_corrupt_tokenizer_names_the_folder(checkpoint):
    (checkpoint / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ArtifactError, match=f"^{checkpoint}: unreadable tokenizer folder") as info:
        load_tokenizer(checkpoint)
    record_refusal("tokenizer.json cut short", str(info.value))


def test_corrupt_gguf_names_the_file(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 60)
    with pytest.raises(ArtifactError, match=f"^{gguf}: unreadable GGUF file") as info:
        load_gguf_model(gguf)
    record_refusal("a .gguf model.source of zeros after its magic number", str(info.value))


def test_truncated_parquet_blocks_name_the_file(tmp_path):
    path = tmp_path / "train.parquet"
    write_blocks(path, torch.arange(4096, dtype=torch.int32).view(64, 64))
    truncate(path, 0.7)
    with pytest.raises(ArtifactError, match=f"^{path}: unreadable token blocks") as info:
        read_blocks(path)
    record_refusal("Parquet token blocks cut at 70%", str(info.value))


def test_corrupt_checkpoint_and_resume_state_name_the_file(tmp_path):
    good, bad = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.ones(64)}, str(good))
    save_file({"w": torch.ones(64)}, str(bad))
    truncate(bad)
    with pytest.raises(ArtifactError, match=f"^{bad}: unreadable checkpoint") as info:
        average_checkpoints([good, bad], [0.5, 0.5])
    record_refusal("a fine-tuning checkpoint cut in half", str(info.value))
    saved = tmp_path / "state" / "step-000004"
    saved.mkdir(parents=True)
    (saved / "tensors.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{broken}")
    (saved / "state.json").write_text("{}")
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ArtifactError, match=f"^{saved}: unreadable resume state") as info:
        load_train_state(tmp_path / "state", model, torch.optim.AdamW(model.parameters()), None)
    record_refusal("a fine-tuning resume state with a broken header", str(info.value))


def test_corrupt_json_names_the_file(tmp_path):
    path = tmp_path / "checkpoints.json"
    path.write_text('{"runs": [')
    with pytest.raises(ArtifactError, match=f"^{path}: unreadable JSON file \\(JSONDecodeError"):
        read_json(path)
    with pytest.raises(ArtifactError, match=f"^{tmp_path / 'none.json'}: missing$"):
        read_json(tmp_path / "none.json")


@pytest.mark.parametrize("name, damage, problem", [
    ("stats.safetensors", lambda p: truncate(p), "tensors end at byte"),
    ("stats.safetensors", lambda p: p.write_bytes(b"\x00\x00\x01\x00\x00\x00\x00\x00{"),
     "header length 65536 exceeds the file (9 bytes)"),
    ("stats.safetensors", lambda p: p.write_bytes(b"abc"), "3 bytes, shorter than a safetensors"),
    ("blocks.parquet", lambda p: truncate(p), "ArrowInvalid"),
    ("masks.json", lambda p: p.write_text("{"), "JSONDecodeError"),
    ("model.gguf", lambda p: p.write_bytes(b"GGML" + bytes(60)), "no GGUF magic number"),
])
def test_check_artifact_finds_damage_without_loading(tmp_path, name, damage, problem):
    path = tmp_path / "folder" / name
    path.parent.mkdir()
    if name.endswith(".safetensors"):
        save_file({"g": torch.ones(8, 8)}, str(path))
    elif name.endswith(".parquet"):
        write_blocks(path, torch.zeros(16, 8, dtype=torch.int32))
    else:
        path.write_bytes(b"GGUF" + bytes(60) if name.endswith(".gguf") else b"{}")
    check_artifact(path.parent)  # intact
    damage(path)
    with pytest.raises(ArtifactError) as info:
        check_artifact(path.parent)
    assert info.value.path == path
    assert problem in str(info.value)
    record_refusal(f"gradprune check: damaged {name} ({problem})", str(info.value))


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """dvc.yaml and params.yaml of the repository (micro params) and no artifacts yet."""
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(micro_params()))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_check_passes_a_fresh_clone_and_names_bad_params(repo):
    assert check_pipeline(repo) == []  # every missing artifact is made by a stage upstream
    params = micro_params()
    params["masks"]["sparsity"] = 1.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert check_pipeline(repo) == ["params: masks.sparsity: must be in [0, 1), got 1.5"]


def test_check_names_a_corrupt_upstream_artifact_its_reader_and_writer(repo):
    stats = repo / "data" / "gradients" / "stats.safetensors"
    stats.parent.mkdir(parents=True)
    save_file({"g": torch.ones(4)}, str(stats))
    assert check_pipeline(repo) == []
    # 8 length bytes + a 56-byte header + 16 tensor bytes = 80; half of it is left.
    truncate(stats)
    record_refusal("gradprune check: truncated data/gradients/stats.safetensors",
                   check_pipeline(repo)[0])
    assert check_pipeline(repo) == [
        f"{repo / 'data/gradients/stats.safetensors'}: unreadable safetensors file (ValueError: "
        "header length 56 exceeds the file (40 bytes)) (read by stage masks); it is "
        "written by stage gradients: restore DVC's cached copy with `dvc checkout --force "
        "data/gradients`, or rebuild it with `dvc repro -f -s gradients`"]


def test_check_names_a_corrupt_model_source_by_its_key(repo, checkpoint):
    params = micro_params()
    params["model"]["source"] = str(checkpoint)
    params["data"]["tokenizer"] = "model"
    params["train"]["steps"] = 0
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert check_pipeline(repo) == []
    truncate(checkpoint / "model.safetensors")
    (problem,) = check_pipeline(repo)
    record_refusal("gradprune check: model.source with a truncated model.safetensors", problem)
    assert problem.startswith(f"{checkpoint / 'model.safetensors'}: unreadable safetensors file")
    assert problem.endswith(f"(read by params model.source); it is model.source in params.yaml "
                            f"({checkpoint}): replace it with a good copy or point model.source "
                            "elsewhere")


def test_check_refuses_an_unknown_stage(repo):
    assert check_pipeline(repo, ["trian"]) == [
        "unknown stage trian; dvc.yaml has prepare, train, gradients, masks, compare, "
        "finetune, average, evaluate"]


def test_writer_and_remedy_follow_dvc_yaml(repo):
    assert writer_of("data/masks/masks.safetensors", repo) == "masks"
    assert writer_of("metrics/compare/sparsegpt-2:4.json", repo) == "compare"
    assert writer_of("plots/finetune_curve.json", repo) == "finetune"
    assert writer_of("elsewhere/x.json", repo) is None
    assert artifact_remedy("data/finetune/run-0/ckpt-1.safetensors", None, repo) == (
        "it is written by stage finetune: restore DVC's cached copy with `dvc checkout "
        "--force data/finetune`, or rebuild it with `dvc repro -f -s finetune`")


def test_recovery_note_names_what_dvc_removed(repo, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "masks")
    assert recovery_note("masks") == (
        "note: dvc repro removed this stage's outputs before it ran; `dvc checkout masks` "
        "restores data/masks from DVC's cache; `git checkout -- reports/masks.json "
        "metrics/masks.json` restores the committed copies. Run `gradprune check` before `dvc repro`: it finds bad params and "
        "unreadable artifacts before anything is removed")
    monkeypatch.delenv("DVC_STAGE")
    assert recovery_note("masks") == ("`gradprune check` finds bad params and unreadable "
                                      "artifacts in seconds")


@pytest.mark.integration
def test_gradprune_check_command(repo):
    import subprocess

    code = "from flows.cli import main; main(['check'])"
    env = {"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)}
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                          env=env)
    assert (done.returncode, done.stdout.strip()) == (
        0, "gradprune check: params.yaml and every artifact the stages read are usable")
    (repo / "data" / "prepare").mkdir(parents=True)
    (repo / "data" / "prepare" / "train.parquet").write_bytes(b"PAR1")
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                          env=env)
    assert done.returncode == 2
    assert done.stderr.startswith("error: data/prepare/train.parquet: unreadable Parquet file "
                                  "(ArrowInvalid")
    assert "(read by stage train); it is written by stage prepare" in done.stderr


def test_a_stage_names_the_stage_to_rerun(repo, capsys, monkeypatch):
    from gradprune.config import params_from_dict
    from tasks.stage import Stage, _report_expected_error

    monkeypatch.delenv("DVC_STAGE", raising=False)
    stats = Path("data/gradients/stats.safetensors")
    _report_expected_error(ArtifactError(stats, "unreadable safetensors file (ValueError: x)"),
                           Stage("masks", params_from_dict(micro_params())))
    assert capsys.readouterr().err == (
        "error: data/gradients/stats.safetensors: unreadable safetensors file (ValueError: x); "
        "it is written by stage gradients: restore DVC's cached copy with `dvc checkout --force "
        "data/gradients`, or rebuild it with `dvc repro -f -s gradients`\n"
        "`gradprune check` finds bad params and unreadable artifacts in seconds\n")


@pytest.mark.integration
@pytest.mark.parametrize("writer", ["dir", "file"])
def test_a_failed_write_names_the_output_and_leaves_no_temporary(tmp_path, writer):
    """Under a 4 KiB file size limit (Python ignores SIGXFSZ, so the write fails with EFBIG)."""
    import subprocess

    code = (
        "import resource, sys\n"
        "from gradprune.io import OutputWriteError, atomic_dir, write_json\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        f"out = {str(tmp_path / 'out')!r}\n"
        "try:\n"
        f"    if {writer!r} == 'dir':\n"
        "        with atomic_dir(out) as d:\n"
        "            (d / 'big.bin').write_bytes(bytes(8192))\n"
        "    else:\n"
        "        write_json(out, ['x' * 8192])\n"
        "except OutputWriteError as err:\n"
        "    print(err)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT)})
    record_refusal(f"a stage output write under a 4 KiB file size limit ({writer})", done.stdout)
    assert done.stdout == (f"{tmp_path / 'out'}: could not be written ([Errno 27] File too "
                           "large); is the disk full, a file size limit (ulimit -f) set, or the "
                           "folder read-only? Nothing was half-written: the temporary copy is "
                           "removed\n"), done.stderr
    assert list(tmp_path.iterdir()) == []
