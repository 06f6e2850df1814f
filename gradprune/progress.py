"""Progress of long loops: a tqdm bar on a terminal; elsewhere (dvc repro's log, CI, a Prefect
task's captured output) a log line at most every PROGRESS_SECONDS saying what, how far and how
long so far, so no stage is silent for long."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

# Seconds between progress lines when stderr is not a terminal; the variable shortens it in tests.
PROGRESS_SECONDS_ENV = "GRADPRUNE_PROGRESS_SECONDS"
PROGRESS_SECONDS = 20.0

log = logging.getLogger("gradprune.progress")
Item = TypeVar("Item")


def progress_interval() -> float:
    return float(os.environ.get(PROGRESS_SECONDS_ENV, PROGRESS_SECONDS))


def elapsed(seconds: float) -> str:
    """62.4 -> '1m02s', 8.2 -> '8s'."""
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"


def progress_bar(items: Iterable[Item], desc: str, total: int | None = None) -> Iterable[Item]:
    """`items` with a tqdm bar on stderr when stderr is a terminal, else with a progress log
    line (logger gradprune.progress) at most every progress_interval() seconds."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm
        return tqdm(items, desc=desc, total=total, leave=False)
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    return _logged(items, desc, total, progress_interval())


def _logged(items: Iterable[Item], desc: str, total: int | None,
            interval: float) -> Iterator[Item]:
    started = last = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= interval:
            share = f"{done}/{total} ({done / total:.0%})" if total else f"{done}"
            log.info("%s: %s, %s", desc, share, elapsed(now - started))
            last = now
