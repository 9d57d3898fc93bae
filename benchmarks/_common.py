"""What the benchmark scripts share: the fixed model size of the targets, quiet Kedro logging,
features built by the real pipelines in a temporary copy of the project, and the results file
each script writes (benchmarks/results/<script>.md), so that measured figures live in one place."""

from __future__ import annotations

import io
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from importlib import metadata
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# harness/sandbox.py (Kedro runs in a throw-away project copy) is not part of the package.
sys.path.insert(0, str(PROJECT_ROOT / "harness"))
RESULTS = PROJECT_ROOT / "benchmarks" / "results"

# Kedro 1.7's config loader still calls OmegaConf's deprecated resolver API.
warnings.filterwarnings("ignore", r"register_new_resolver\(\) is deprecated", UserWarning)

# The fixed size every benchmark target is stated at: history 50, embedding 32 for items and
# for categories, attention unit 80-40 (DIN), MLP 200-80.
HISTORY = 50
FIXED_SIZE = {"embedding_dim": 32, "mlp_hidden": [200, 80]}
ATTENTION_UNIT = {"din": {"attention_hidden": [80, 40]}}


def fixed_size(name: str) -> dict:
    """Constructor options that set model `name` to the fixed size."""
    return {**FIXED_SIZE, **ATTENTION_UNIT.get(name, {})}


def quiet_kedro_logging() -> None:
    """Point Kedro at a logging config that only shows warnings (unless one is already set).
    INFO records are still made (root level INFO), for handlers such as feature_engineering.py's
    node timer; the console shows WARNING and above."""
    path = Path(tempfile.gettempdir()) / "attention_ctr_bench_logging.yml"
    path.write_text(
        "version: 1\ndisable_existing_loggers: false\n"
        "handlers: {console: {class: logging.StreamHandler, level: WARNING}}\n"
        "root: {level: INFO, handlers: [console]}\n"
    )
    os.environ.setdefault("KEDRO_LOGGING_CONFIG", str(path))


def build_features(
    params: dict,
    outputs: tuple[str, ...],
    env: str | None = None,
    raw_files: dict[str, Path] | None = None,
) -> dict:
    """Run ingestion and feature_engineering in a throw-away project copy; load `outputs`.

    `raw_files` maps paths under the copy's `data/01_raw/` to files to put there first (the
    logs an environment such as `movielens` reads).
    """
    quiet_kedro_logging()
    from sandbox import make_project_copy, run_pipeline

    workdir = Path(tempfile.mkdtemp(prefix="bench-features-"))
    try:
        project = make_project_copy(workdir / "project", source=PROJECT_ROOT)
        for relative, source in (raw_files or {}).items():
            destination = project / "data" / "01_raw" / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, destination)
        catalog = run_pipeline(
            project, params=params, env=env, pipelines=["ingestion", "feature_engineering"]
        )
        # keyed by dataset, without the transcoding suffix (events@pandas -> events)
        return {name.partition("@")[0]: catalog.load(name) for name in outputs}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


class _Tee(io.TextIOBase):
    """A text stream that writes to several streams."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextmanager
def recorded(output: Path) -> Iterator[None]:
    """Print as usual and keep a copy; when the block ends without an error, write the copy to
    `output` (markdown) under a header: the command, date and machine. A failed run leaves the
    previous results in place."""
    started = time.perf_counter()
    copy = io.StringIO()
    with redirect_stdout(_Tee(sys.stdout, copy)):
        yield
    script = Path(sys.argv[0]).name
    header = (
        f"# benchmarks/{script}\n\n"
        f"Written by the script, every run overwrites it. Command: "
        f"`{shlex.join(['python', f'benchmarks/{script}', *sys.argv[1:]])}` "
        f"(wall time {(time.perf_counter() - started) / 60:.1f} min).\n\n"
        f"{time.strftime('%Y-%m-%d')}, {cpu_model()}, {os.cpu_count()} CPUs; "
        f"torch {_version('torch')}, onnxruntime {_version('onnxruntime')}, "
        f"attention_ctr {_version('attention_ctr')}.\n"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(f"{header}\n```text\n{copy.getvalue().strip()}\n```\n")
    print(f"written to {output}")
