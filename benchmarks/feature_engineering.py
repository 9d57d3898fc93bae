"""Benchmark: ingestion + feature engineering on N synthetic events, through the real pipelines.

    python benchmarks/feature_engineering.py                 # 10 M events
    python benchmarks/feature_engineering.py --events 1000000

Runs `kedro run --pipeline ingestion` and `--pipeline feature_engineering` in one session on a
temporary copy of the project (so the project's own data/ is untouched) and prints wall time,
events per second, peak RSS and the time of every node. Target on a 2-core machine:
10 M events in <= 60 s with <= 4 GB peak RSS. What it prints is also written to
benchmarks/results/feature_engineering.md, under the command, date and machine.
"""

from __future__ import annotations

import argparse
import logging
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import PROJECT_ROOT, RESULTS, quiet_kedro_logging, recorded


class NodeTimer(logging.Handler):
    """Per-node wall time from the sequential runner's 'Completed node' log records."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.last = time.perf_counter()
        self.durations: list[tuple[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        now = time.perf_counter()
        if message.startswith("Running node"):
            self.last = now
        match = re.match(r"Completed node: (\S+)", message)
        if match:
            self.durations.append((match.group(1), now - self.last))
            self.last = now


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, help="default: events / 100")
    parser.add_argument("--items", type=int, help="default: events / 25")
    parser.add_argument("--categories", type=int, help="default: items / 100")
    parser.add_argument(
        "--keep", type=Path, help="keep the project copy here instead of a temp dir"
    )
    args = parser.parse_args()

    users = args.users or max(1, args.events // 100)
    items = args.items or max(10, args.events // 25)
    categories = args.categories or max(1, items // 100)
    params = {
        "ingestion.synthetic.events": args.events,
        "ingestion.synthetic.users": users,
        "ingestion.synthetic.items": items,
        "ingestion.synthetic.categories": categories,
    }

    workdir = args.keep or Path(tempfile.mkdtemp(prefix="fe-bench-"))
    # Quiet console (warnings only); node timings still flow to the timer below. The config
    # names no `kedro` logger: applying one would strip the handlers of its children
    # (logging.config clears a configured logger's existing children), the timer's included.
    quiet_kedro_logging()
    # Kedro reads KEDRO_LOGGING_CONFIG when it is first imported: only after it is set
    from sandbox import make_project_copy, run_pipeline

    project = make_project_copy(workdir / "project", source=PROJECT_ROOT)
    timer = NodeTimer()
    logging.getLogger("kedro.runner").addHandler(timer)
    try:
        start = time.perf_counter()
        run_pipeline(project, "ingestion", params)
        ingestion_done = time.perf_counter()
        run_pipeline(project, "feature_engineering", params)
        done = time.perf_counter()
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)

    total = done - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB
    print(
        f"\nevents            {args.events:,} ({users:,} users, {items:,} items, "
        f"{categories:,} categories)"
    )
    print(f"ingestion         {ingestion_done - start:8.1f} s")
    print(f"feature eng.      {done - ingestion_done:8.1f} s")
    print(f"total             {total:8.1f} s   {args.events / total:,.0f} events/s")
    print(f"peak RSS          {peak_gb:8.2f} GB")
    print("per node (incl. its loads and saves):")
    for name, seconds in timer.durations:
        print(f"  {name:44s} {seconds:7.2f} s")
    return 0


if __name__ == "__main__":
    # what it printed also goes to benchmarks/results/, under the command and machine
    with recorded(RESULTS / "feature_engineering.md"):
        status = main()
    sys.exit(status)
