"""Benchmark: ingestion + feature engineering on N synthetic events, through the real pipelines.

    python benchmarks/feature_engineering.py                 # pandas, 10 M events
    python benchmarks/feature_engineering.py --events 1000000
    python benchmarks/feature_engineering.py --engine spark --events 100000000
    python benchmarks/feature_engineering.py --engine spark --compare-events 0 --train din

Runs `kedro run --pipeline ingestion` and `--pipeline feature_engineering` on a temporary copy
of the project (so the project's own data/ is untouched) and prints wall time, events per
second, peak memory and the time of every node. The log is generated first (the pandas
generator, timed apart; in chunks above 10 M events), then read, validated and turned into
features. Targets on a 2-core machine: pandas, 10 M events in <= 60 s with generating the log,
with <= 4 GB peak RSS; Spark (`--env spark`), 100 M events in <= 30 min within 16 GB, and 10 M
within 2x of pandas.

With `--engine spark`, pandas and Spark first both run on `--compare-events` events (10 M), so
one run gives both comparisons. Peak memory is sampled:
this process plus its children (the Spark JVM, its Python workers). What it prints is also
written to benchmarks/results/feature_engineering.md, under the command, date and machine.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
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


# The project's generator holds a whole log in memory (about 2 GB per 10 M events): larger
# logs are written as independent logs of this many events, each of its own users.
CHUNK_EVENTS = 10_000_000


def write_log_in_chunks(project: Path, params: dict) -> None:
    """The synthetic log of `params` as `events / CHUNK_EVENTS` seeded logs of as many users,
    sharing the item and category space, appended to the CSV the pipeline reads."""
    from attention_ctr.raw_logs import write_taobao
    from attention_ctr.synthetic import SyntheticLogConfig, generate_behavior_logs

    events, users = params["ingestion.synthetic.events"], params["ingestion.synthetic.users"]
    chunks = -(-events // CHUNK_EVENTS)
    path = project / "data" / "01_raw" / "synthetic" / "UserBehavior.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as log:
        for chunk in range(chunks):
            config = SyntheticLogConfig(
                users=users // chunks,
                items=params["ingestion.synthetic.items"],
                categories=params["ingestion.synthetic.categories"],
                events=events // chunks,
                seed=42 + chunk,
            )
            frame = generate_behavior_logs(config)
            frame["user_id"] += chunk * 3 * config.users  # raw user ids lie below 3 * users
            part = path.with_suffix(f".part{chunk}")
            write_taobao(frame, part)
            del frame
            log.write(part.read_bytes())
            part.unlink()


def generate_log(project: Path, params: dict) -> None:
    """The synthetic log of `params`, where the pipeline reads it."""
    if params["ingestion.synthetic.events"] > CHUNK_EVENTS:
        write_log_in_chunks(project, params)
    else:
        from sandbox import run_pipeline

        run_pipeline(project, "ingestion", params, node_names=["ingestion.generate_synthetic_logs"])


class MemorySampler:
    """Peak resident memory of this process and all its descendants (the Spark JVM and its
    Python workers), sampled every 0.2 s; `reset()` starts a new phase."""

    def __init__(self) -> None:
        self.peak, self.at_peak = 0, []
        self._phase = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _current(self) -> tuple[int, list[tuple[int, str]]]:
        """Summed RSS, and each process's (RSS, name), largest first."""
        me = psutil.Process()
        processes = []
        for process in [me, *me.children(recursive=True)]:
            try:
                processes.append((process.memory_info().rss, process.name()))
            except psutil.Error:
                pass
        return sum(rss for rss, _ in processes), sorted(processes, reverse=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            phase = self._phase
            current, processes = self._current()
            with self._lock:
                # Not a sample of the phase before a reset.
                if phase == self._phase and current > self.peak:
                    self.peak, self.at_peak = current, processes

    def reset(self) -> None:
        with self._lock:
            self._phase += 1
            self.peak, self.at_peak = self._current()

    def describe_peak(self) -> str:
        """The processes that made the peak: the largest three."""
        return ", ".join(f"{name} {rss / 1024**3:.2f}" for rss, name in self.at_peak[:3])

    def stop(self) -> None:
        self._stop.set()


def in_child(function, *args):
    """`function(*args)` in a fresh (spawned) process, and its result: each run's memory and
    Spark JVM end with it, and the next run's peak starts clean."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_put_result, args=(results, function, *args))
    child.start()
    while True:  # the result first: a child exits only once its queue is flushed
        try:
            result = results.get(timeout=1)
            break
        except queue.Empty:
            if not child.is_alive():
                raise RuntimeError(
                    f"{function.__name__} failed (exit code {child.exitcode})"
                ) from None
    child.join()
    return result


def _put_result(results, function, *args) -> None:
    # Quiet console (warnings only); node timings still reach NodeTimer. The config names no
    # `kedro` logger: applying one would strip the handlers of its children (logging.config
    # clears a configured logger's existing children), the timer's included.
    quiet_kedro_logging()
    results.put(function(*args))


def run_once(project: Path, engine: str, events: int, args, memory: MemorySampler) -> dict:
    """Ingestion and feature engineering on `events` synthetic events; timings and peaks."""
    users = args.users or max(1, events // 100)
    items = args.items or max(10, events // 25)
    categories = args.categories or max(1, items // 100)
    params = {
        "ingestion.synthetic.events": events,
        "ingestion.synthetic.users": users,
        "ingestion.synthetic.items": items,
        "ingestion.synthetic.categories": categories,
    }
    for layer in (project / "data").iterdir():  # a clean start: the last run's files go
        shutil.rmtree(layer)
        layer.mkdir()
    result = {"engine": engine, "events": events, "users": users, "items": items}
    result["categories"] = categories
    # Both engines read a log generated first and timed apart.
    memory.reset()
    start = time.perf_counter()
    in_child(generate_log, project, params)
    result["generation"] = time.perf_counter() - start
    result["generation_peak"] = memory.peak
    memory.reset()
    result.update(in_child(run_features, project, engine, params))
    result["peak"], result["at_peak"] = memory.peak, memory.describe_peak()
    return result


def run_features(project: Path, engine: str, params: dict) -> dict:
    """`kedro run` of ingestion (from reading the log) and feature engineering: wall time and
    each node's. Timed after Python has imported the project."""
    from kedro.framework.startup import bootstrap_project
    from sandbox import run_pipeline

    bootstrap_project(project)  # the copy's package, imported before the clock starts
    import attention_ctr.pipeline_registry  # noqa: F401  (the pipelines, torch)

    timer = NodeTimer()
    logging.getLogger("kedro.runner").addHandler(timer)
    start = time.perf_counter()
    run_pipeline(
        project,
        params=params,
        env=None if engine == "pandas" else "spark",
        pipelines=["ingestion", "feature_engineering"],
        from_nodes=["ingestion.read_behavior_logs"],
    )
    return {"total": time.perf_counter() - start, "nodes": list(timer.durations)}


def train_once(project: Path, model: str, budget_mb: float) -> None:
    """One epoch of `model` on the features the last run wrote, through the training node
    (streamed from parquet when a split outgrows half of `budget_mb`)."""
    from attention_ctr.datasets import ParquetTable

    samples = len(ParquetTable(project / "data" / "05_model_input" / "train_samples.parquet"))
    result = in_child(train_model, project, model, budget_mb)
    print(
        f"\ntraining {model}, 1 epoch on those features, memory budget {budget_mb:,.0f} MB"
        f"\n  train samples              {samples:,}"
        f"\n  samples/s                  {result['samples_per_second']:,.0f}"
        f"\n  validation AUC             {result['validation_auc']:.4f}"
        f"\n  training node              {result['wall']:8.1f} s (with validation and saving)"
        f"\n  peak memory                {result['peak'] / 1024**3:8.2f} GB (the training process)"
    )


def train_model(project: Path, model: str, budget_mb: float) -> dict:
    import resource

    from sandbox import run_pipeline

    params = {
        "training.epochs": 1,
        "training.memory_budget_mb": budget_mb,
        "training.progress_bar": False,
    }
    start = time.perf_counter()
    catalog = run_pipeline(project, pipeline="training", namespaces=[model], params=params)
    history = catalog.load(f"{model}.training_history")
    return {
        "wall": time.perf_counter() - start,
        "samples_per_second": float(history["train_samples_per_second"].iloc[0]),
        "validation_auc": float(history["validation_auc"].iloc[0]),
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def report(result: dict) -> None:
    print(
        f"\n{result['engine']}: {result['events']:,} events ({result['users']:,} users, "
        f"{result['items']:,} items, {result['categories']:,} categories)"
    )
    print(
        f"  generate the log (pandas)  {result['generation']:8.1f} s   peak "
        f"{result['generation_peak'] / 1024**3:6.2f} GB   (not in the total)"
    )
    total = result["total"]
    print(f"  total                      {total:8.1f} s   {result['events'] / total:,.0f} events/s")
    print(f"  total with generating      {total + result['generation']:8.1f} s")
    print(
        f"  peak memory                {result['peak'] / 1024**3:8.2f} GB (with children; "
        f"GB at the peak: {result['at_peak']})"
    )
    print("  per node (incl. its loads and saves):")
    for name, seconds in result["nodes"]:
        print(f"    {name:44s} {seconds:8.2f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, help="default: events / 100")
    parser.add_argument("--items", type=int, help="default: events / 25")
    parser.add_argument("--categories", type=int, help="default: items / 100")
    parser.add_argument(
        "--keep", type=Path, help="keep the project copy here instead of a temp dir"
    )
    parser.add_argument("--engine", choices=("pandas", "spark"), default="pandas")
    parser.add_argument(
        "--compare-events",
        type=int,
        default=10_000_000,
        help="with --engine spark: first run pandas and Spark on this many events (0: skip)",
    )
    parser.add_argument(
        "--train",
        metavar="MODEL",
        help="then train MODEL (din, ...) one epoch on the last run's features",
    )
    parser.add_argument(
        "--memory-budget-mb",
        type=float,
        default=512,
        help="with --train: training.memory_budget_mb (splits larger than half are streamed)",
    )
    args = parser.parse_args()

    memory = MemorySampler()
    # One project copy; each run is a process of its own (`in_child`).
    from sandbox import make_project_copy

    workdir = args.keep or Path(tempfile.mkdtemp(prefix="fe-bench-"))
    project = make_project_copy(workdir / "project", source=PROJECT_ROOT)
    try:
        results = []
        if args.engine == "spark" and args.compare_events:
            for engine in ("pandas", "spark"):
                results.append(run_once(project, engine, args.compare_events, args, memory))
                report(results[-1])
            pandas, spark = results
            print(
                f"\nSpark / pandas at {args.compare_events:,} events: "
                f"{spark['total'] / pandas['total']:.2f}x the wall time (log generation excluded)"
            )
        results.append(run_once(project, args.engine, args.events, args, memory))
        report(results[-1])
        if args.train:
            train_once(project, args.train, args.memory_budget_mb)
    finally:
        memory.stop()
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    # what it printed also goes to benchmarks/results/, under the command and machine
    # A training run keeps its own file: the feature runs' figures stay.
    name = "feature_engineering_train.md" if "--train" in sys.argv else "feature_engineering.md"
    with recorded(RESULTS / name):
        status = main()
    sys.exit(status)
