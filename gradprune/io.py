"""Atomic writes: every output appears whole under its final name, or not at all. Reads of
artifacts: any failure names the file (ArtifactError), and `check_artifact` finds a truncated
or overwritten file in milliseconds, before a stage computes anything."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

# What a full disk, a file size limit (ulimit -f) or a read-only folder raise: OSError numbers,
# and the words of writers that wrap the error in their own type (safetensors' Rust IoError).
WRITE_FAILURE_ERRNOS = {errno.EFBIG, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                        errno.EPERM}
WRITE_FAILURE_WORDS = ("File too large", "No space left", "Read-only file system",
                       "Disk quota", "FileTooLarge", "StorageFull", "ReadOnlyFilesystem")


class OutputWriteError(ValueError):
    """A stage output that could not be written (disk full, size limit, read-only folder)."""

    def __init__(self, path: str | Path, err: BaseException):
        self.path = Path(path)
        detail = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        super().__init__(f"{path}: could not be written ({detail}); is the disk full, a file "
                         "size limit (ulimit -f) set, or the folder read-only? Nothing was "
                         "half-written: the temporary copy is removed")


def _is_write_failure(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in WRITE_FAILURE_ERRNOS:
        return True
    return any(word in str(err) for word in WRITE_FAILURE_WORDS)


@contextlib.contextmanager
def _named_write_failures(path: Path) -> Iterator[None]:
    try:
        yield
    except OutputWriteError:
        raise
    except Exception as err:
        if _is_write_failure(err):
            raise OutputWriteError(path, err) from err
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path`.

    On an exception the temporary folder is removed and `path` is left as it was, so DVC never
    sees (or caches) a half-written stage output; a failed write is an OutputWriteError.
    """
    path = Path(path)
    with _named_write_failures(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    with _named_write_failures(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)


class ArtifactError(ValueError):
    """An artifact that is missing or cannot be read; `path` names it, so the stage runner can
    say which stage writes it (or which params key points to it)."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        super().__init__(f"{path}: {problem}")


@contextlib.contextmanager
def reading(path: str | Path, what: str) -> Iterator[None]:
    """Any failure while reading `path` (truncated safetensors, bad JSON, a broken Parquet
    block, a tokenizer file that does not parse) becomes an ArtifactError naming the file.
    Libraries raise all sorts here (tokenizers raises bare Exception), hence the breadth."""
    try:
        yield
    except ArtifactError:
        raise
    except MemoryError:
        raise
    except Exception as err:
        detail = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise ArtifactError(path, f"unreadable {what} ({type(err).__name__}"
                                  f"{': ' + detail if detail else ''})") from err


def check_artifact(path: str | Path) -> None:
    """Structural check of one file or of every file in a folder, without loading tensors:
    safetensors header and length, Parquet footer and every data page, JSON syntax, GGUF magic.
    Raises ArtifactError naming the first bad file."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(path, "missing")
    for file in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        suffix = file.suffix
        if suffix == ".safetensors":
            with reading(file, "safetensors file"):
                _check_safetensors(file)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            with reading(file, "Parquet file"):
                pq.read_table(file)
        elif suffix == ".json":
            with reading(file, "JSON file"):
                json.loads(file.read_text())
        elif suffix == ".gguf":
            with reading(file, "GGUF file"):
                with open(file, "rb") as f:
                    if f.read(4) != b"GGUF":
                        raise ValueError("no GGUF magic number at the start")


def _check_safetensors(path: Path) -> None:
    """The header parses and the tensors' byte ranges end exactly at the end of the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{size} bytes, shorter than a safetensors header")
        length = int.from_bytes(prefix, "little")
        if length > size - 8:
            raise ValueError(f"header length {length} exceeds the file ({size} bytes)")
        header = json.loads(f.read(length))
    end = max((info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"),
              default=0)
    if 8 + length + end != size:
        raise ValueError(f"tensors end at byte {8 + length + end} but the file has {size}")


def write_json(path: str | Path, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(path, "missing")
    with reading(path, "JSON file"):
        return json.loads(path.read_text())


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete `.NAME.tmp-*` leftovers of a process that was killed mid-write."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for leftover in folder.glob(".*.tmp-*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
