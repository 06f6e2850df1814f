"""docs/RELIABILITY.md's table of refused inputs, generated from the tests that check them.

    python scripts/reliability_table.py                 # the unit tests (about a minute)
    python scripts/reliability_table.py --integration   # also the fault suite (dvc repro runs)

Runs the bad-input tests with GRADPRUNE_REFUSALS set: each records what it fed in and the
message the user got (tests/conftest.py record_refusal). The table between the markers in
docs/RELIABILITY.md is replaced; the tests must pass, else nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "RELIABILITY.md"
START, END = "<!-- refusals:start -->", "<!-- refusals:end -->"
UNIT = ["tests/test_config.py", "tests/test_bad_input.py", "tests/test_artifacts.py",
        "tests/test_fsdp.py::test_fsdp_in_one_process_stops_before_compute"]
INTEGRATION = ["tests/test_faults.py::test_shell_code_in_params_never_runs",
               "tests/test_faults.py::test_bad_params_after_a_run_are_cheap_to_recover",
               "tests/test_faults.py::test_a_full_disk_fails_clearly_and_keeps_outputs_and_cache"]
# pytest's temporary folders: the same message on every machine.
TMP = re.compile(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/\s]+?\d*/")


def collect(tests: list[str]) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
        records = Path(f.name)
    env = {**os.environ, "GRADPRUNE_REFUSALS": str(records)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *tests], cwd=ROOT, env=env)
    if done.returncode != 0:
        sys.exit(f"the tests failed (exit {done.returncode}); {DOC} left as it is")
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    records.unlink()
    unique = {}
    for row in rows:
        unique.setdefault(row["kind"], TMP.sub("<tmp>/", row["message"]))
    return [{"kind": k, "message": m} for k, m in unique.items()]


def cell(text: str) -> str:
    return "`" + text.replace("|", "\\|").replace("`", "'").replace("\n", "` <br> `") + "`"


def table(rows: list[dict], command: str) -> str:
    lines = [f"{len(rows)} kinds of bad input or failed write, each stopped with the message "
             f"shown, bad input before any compute (`{command}`):", "", "| input | message |",
             "| --- | --- |"]
    lines += [f"| {cell(r['kind'])} | {cell(r['message'])} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--integration", action="store_true",
                        help="also run the fault suite's refusals (dvc repro in micro repos)")
    args = parser.parse_args()
    command = "python scripts/reliability_table.py" + (" --integration" if args.integration else "")
    rows = collect(UNIT + (INTEGRATION if args.integration else []))
    text = DOC.read_text()
    before, _, rest = text.partition(START)
    _, _, after = rest.partition(END)
    DOC.write_text(f"{before}{START}\n{table(rows, command)}\n{END}{after}")
    print(f"{DOC.relative_to(ROOT)}: {len(rows)} kinds of bad input")


if __name__ == "__main__":
    main()
