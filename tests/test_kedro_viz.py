"""kedro-viz on the project: the static site opened in headless Chromium, and the live server."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, require, require_module, run_kedro
from kedro.framework.project import pipelines
from kedro.framework.startup import bootstrap_project

from attention_ctr.models import MODELS

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
# Headless on a closed network: no sandbox as root, no background connections to Google.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", PROJECT_ROOT / "test-artifacts"))
KEY_DATASETS = [
    "synthetic_behavior_logs",
    "raw_behavior_logs",
    "interactions",
    "quarantined_rows",
    "ingestion_report",
    "events",
    "train_samples",
    "validation_samples",
    "test_samples",
    "feature_spec",
    "model_comparison",
    "promoted_models",
    *(f"{name}.{dataset}" for name in MODELS for dataset in ("model", "test_metrics")),
    *(f"{name}.{graph}" for name in MODELS for graph in ("onnx_model", "onnx_request_model")),
]


def _expected(pipeline) -> tuple[set[str], list[str]]:
    """(datasets kedro-viz draws, task labels) of a pipeline: parameters hidden, transcoding
    merged, task nodes labelled with their names inside their namespace."""
    datasets = {name.split("@")[0] for name in pipeline.datasets() if not name.startswith("param")}
    tasks = sorted(node.name.rsplit(".", 1)[-1] for node in pipeline.nodes)
    return datasets, tasks


@pytest.fixture(scope="module")
def viz_site(exported_run):
    """`kedro viz build --include-previews` of the project after a run of every pipeline."""
    require_module("kedro_viz")
    project, _ = exported_run
    shutil.rmtree(project / "build", ignore_errors=True)
    run_kedro(project, "viz", "build", "--include-previews")
    assert (project / "build" / "index.html").is_file()
    return project / "build"


@pytest.fixture(scope="module")
def served(viz_site):
    """The static site on a localhost port."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(QuietHandler, directory=str(viz_site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    require_module("playwright")
    require(
        CHROMIUM.exists(),
        f"{CHROMIUM} not found: install Debian's chromium (`apt-get install chromium`)",
    )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def _open(browser, url: str, pipeline: str, *, expand: bool = True):
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    # The whole project is over kedro-viz's size-warning threshold, which would hold the
    # drawing behind a "Render it anyway" prompt; switch the warning off as a user would.
    page.add_init_script(
        "localStorage.setItem('KedroViz', JSON.stringify({flags: {sizewarning: false}}))"
    )
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{url}/?pid={pipeline}&expandAllPipelines={str(expand).lower()}")
    page.wait_for_selector(".pipeline-node", timeout=60_000)
    return page, errors


def test_every_pipeline_is_listed_and_drawn_with_all_its_nodes_and_datasets(browser, served):
    bootstrap_project(PROJECT_ROOT)
    registered = sorted(pipelines)
    for name in registered:
        page, errors = _open(browser, served, name)
        listed = page.eval_on_selector_all(
            ".pipeline-list .menu-option__content", "options => options.map(o => o.title)"
        )
        assert sorted(listed) == registered
        drawn = page.eval_on_selector_all(
            ".pipeline-node",
            "nodes => nodes.map(n => [n.dataset.nodeType, n.dataset.nodeFullname])",
        )
        datasets, tasks = _expected(pipelines[name])
        assert {full for kind, full in drawn if kind == "data"} == datasets, name
        assert sorted(full for kind, full in drawn if kind == "task") == tasks, name
        assert errors == [], (name, errors)
        page.close()


def test_the_key_datasets_are_on_the_page_and_a_screenshot_is_kept(browser, served):
    page, errors = _open(browser, served, "__default__")
    labels = page.eval_on_selector_all(
        ".pipeline-node__text", "texts => texts.map(t => t.textContent)"
    )
    assert [name for name in KEY_DATASETS if name not in labels] == []
    assert errors == []
    page.close()

    # The screenshot is the overview a user sees first: every namespace a collapsed box.
    page, errors = _open(browser, served, "__default__", expand=False)
    boxes = page.eval_on_selector_all(
        ".pipeline-node--modularPipeline .pipeline-node__text",
        "texts => texts.map(t => t.textContent)",
    )
    assert set(boxes) == {"ingestion", "feature_engineering", *MODELS, "evaluation", "promotion"}
    page.wait_for_timeout(1500)  # let the layout's transitions and the feature tour appear
    for close in page.locator(".feature-hints__close").all():  # the tour hides the chart
        close.click()
    page.wait_for_timeout(500)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "kedro-viz.png"
    page.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 20_000  # a drawn flowchart, not a blank page
    assert errors == []


def _free_port() -> int:
    """A free localhost port below 49152: kedro-viz refuses the ephemeral range above it."""
    for port in range(41410, 41600):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 41410..41599")


def test_kedro_viz_run_serves_the_projects_pipelines(exported_run, tmp_path):
    """`kedro viz run` starts its server on the project (the command docs/kedro_viz.md gives)."""
    require_module("kedro_viz")
    project, _ = exported_run
    port = _free_port()
    log = tmp_path / "kedro-viz-run.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "kedro", "viz", "run", "--no-browser", "--port", str(port)],
        cwd=project,
        stdin=subprocess.DEVNULL,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its server runs in a child process: stop the whole group
    )
    try:
        deadline, main = time.monotonic() + 180, None
        while main is None and time.monotonic() < deadline:
            assert server.poll() is None, f"kedro viz run exited:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/main", timeout=5) as r:
                    main = json.load(r)
            except OSError:
                time.sleep(1)
        assert main is not None, "kedro viz run did not answer within 180 s"
        bootstrap_project(PROJECT_ROOT)
        assert sorted(pipeline["id"] for pipeline in main["pipelines"]) == sorted(pipelines)
        names = {node["name"] for node in main["nodes"]}
        assert set(KEY_DATASETS) <= names
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
