"""`kedro run` as a user types it: bad input ends in one line naming the problem, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from attention_ctr.cli import TRACEBACK_VARIABLE


def kedro_run(project, *arguments: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kedro", "run", *arguments],
        cwd=project,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("traceback", [False, True], ids=["one-line", "traceback-asked-for"])
def test_a_bad_raw_log_fails_kedro_run_with_one_line(project, traceback):
    raw = project / "data" / "01_raw" / "taobao" / "UserBehavior.csv"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text("1,2,3\n4,5,6\n")
    result = kedro_run(
        project,
        "--pipelines",
        "ingestion",
        "--env",
        "taobao",
        env={TRACEBACK_VARIABLE: "1"} if traceback else {TRACEBACK_VARIABLE: ""},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    if traceback:
        assert "Traceback" in output and "RawLogError" in output
        return
    assert "Traceback" not in output, output[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1, result.stderr
    assert "data/01_raw/taobao/UserBehavior.csv has 3 column(s)" in error[0]
    assert "user,item,category,behavior,timestamp" in error[0]
    assert "docs/when_a_run_fails.md" in result.stderr
