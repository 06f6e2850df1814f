"""The stage runner's output: progress lines when stderr is not a terminal, the stage heartbeat,
metrics files of numbers only."""

from __future__ import annotations

import logging
import time

from gradprune.progress import elapsed, progress_bar


def test_progress_lines_say_what_how_far_and_how_long(monkeypatch, caplog):
    monkeypatch.setenv("GRADPRUNE_PROGRESS_SECONDS", "0")
    with caplog.at_level(logging.INFO, logger="gradprune.progress"):
        assert list(progress_bar(range(4), desc="windows")) == [0, 1, 2, 3]
    assert [r.getMessage() for r in caplog.records] == [
        "windows: 1/4 (25%), 0s", "windows: 2/4 (50%), 0s", "windows: 3/4 (75%), 0s",
        "windows: 4/4 (100%), 0s"]


def test_no_line_before_the_interval(monkeypatch, caplog):
    monkeypatch.setenv("GRADPRUNE_PROGRESS_SECONDS", "3600")
    with caplog.at_level(logging.INFO, logger="gradprune.progress"):
        assert sum(progress_bar(iter(range(100)), desc="steps")) == 4950
    assert caplog.records == []


def test_elapsed():
    assert (elapsed(8.2), elapsed(62.4), elapsed(3600)) == ("8s", "1m02s", "60m00s")


def test_heartbeat_speaks_when_the_stage_is_quiet(caplog):
    from tasks.stage import Heartbeat

    logging.getLogger("gradprune").setLevel(logging.INFO)
    heartbeat = Heartbeat()
    with caplog.at_level(logging.INFO, logger="gradprune"):
        heartbeat.start(1.0)
        logging.getLogger("gradprune.finetune").info("run 1 of 2")
        time.sleep(1.6)
        heartbeat.stop()
    beats = [r.getMessage() for r in caplog.records if r.name == "gradprune.heartbeat"]
    assert beats[0] == "working, 1s in; last: run 1 of 2"


def test_metrics_files_hold_numbers_only():
    from tasks.stage import numbers_only

    record = {"criterion": "wanda", "bf16": True, "tasks": ["piqa"], "ratio": None,
              "nan": float("nan"), "seconds": 1.5, "kept": 3,
              "speed": {"settings": {"prompt_len": 16}, "dense": {"tok_s": 10.0}},
              "models": {"dense": {"tasks": {}, "acc": 0.5}}}
    assert numbers_only(record) == {"seconds": 1.5, "kept": 3, "speed": {"dense": {"tok_s": 10.0}},
                                    "models": {"dense": {"acc": 0.5}}}
