"""The committed dvc.lock is the lock of the committed code: every code dep it records has the
md5 of the file as it is now, and each stage's recorded code deps are the ones dvc.yaml lists.

A failure here means `dvc repro` in a fresh clone reruns stages, and the committed metrics came
from other code: regenerate dvc.lock, metrics/ and the README's numbers together from one
`bash scripts/run.sh`.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import stage_deps  # noqa: E402


def md5_of(path: Path) -> str:
    # DVC 3 (`hash: md5`) hashes a file's bytes as they are, with no line-ending conversion.
    return hashlib.md5(path.read_bytes()).hexdigest()


def locked_code_deps(lock: dict) -> dict[str, dict[str, str]]:
    """{locked stage (compare@gradient-2:4 for a matrix row): {code dep: md5}}."""
    return {name: {d["path"]: d["md5"] for d in stage.get("deps", [])
                   if stage_deps.is_code(d["path"])}
            for name, stage in lock["stages"].items()}


def stale_entries(root: Path) -> list[str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    problems = []
    for name, deps in locked_code_deps(lock).items():
        group = name.split("@")[0]
        if group not in spec:
            problems.append(f"{name}: in dvc.lock but not in dvc.yaml")
            continue
        listed = {d for d in spec[group].get("deps", []) if stage_deps.is_code(d)}
        problems += [f"{name}: dvc.yaml lists {p}, dvc.lock does not" for p in sorted(listed - set(deps))]
        problems += [f"{name}: dvc.lock records {p}, dvc.yaml no longer lists it"
                     for p in sorted(set(deps) - listed)]
        for path, md5 in sorted(deps.items()):
            file = root / path
            if file.is_file() and md5_of(file) != md5:
                problems.append(f"{name}: {path} has md5 {md5_of(file)}, dvc.lock records {md5}")
    return problems


def test_every_locked_code_dep_has_the_md5_of_the_committed_file():
    assert stale_entries(ROOT) == [], (
        "dvc.lock is not the lock of this code; regenerate dvc.lock, metrics/ and the README "
        "numbers together with `bash scripts/run.sh`")


def test_a_stale_lock_entry_is_named(tmp_path):
    # md5("print('old')\n") and md5("print('edited')\n"), computed by hand with md5sum.
    old, edited = "16f61b3a79d81e255ff6a290f4110506", "0f59e90a387ced137fb306d70baf54a4"
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "train.py").write_text("print('edited')\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {
        "cmd": "python -m tasks.train", "deps": ["tasks/train.py", "tasks/stage.py",
                                                 "data/prepare"]}}}))
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"train": {
        "cmd": "python -m tasks.train",
        "deps": [{"path": "tasks/train.py", "hash": "md5", "md5": old, "size": 13},
                 {"path": "tasks/old.py", "hash": "md5", "md5": old, "size": 13},
                 {"path": "data/prepare", "hash": "md5", "md5": "0" * 32 + ".dir"}]}}}))
    assert stale_entries(tmp_path) == [
        "train: dvc.yaml lists tasks/stage.py, dvc.lock does not",
        "train: dvc.lock records tasks/old.py, dvc.yaml no longer lists it",
        f"train: tasks/train.py has md5 {edited}, dvc.lock records {old}"]
