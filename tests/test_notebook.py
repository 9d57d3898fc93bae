"""The walkthrough notebook runs top to bottom on a real project, so it never rots."""

from __future__ import annotations

import shutil

import nbformat
import pytest
from conftest import PROJECT_ROOT
from nbclient import NotebookClient

from attention_ctr.models import MODELS


@pytest.mark.slow
def test_walkthrough_notebook_runs_on_a_real_project(exported_run):
    project, _ = exported_run
    folder = project / "notebooks"
    folder.mkdir(exist_ok=True)
    shutil.copy2(PROJECT_ROOT / "notebooks" / "walkthrough.ipynb", folder)
    notebook = nbformat.read(folder / "walkthrough.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    ).execute()

    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output["output_type"] == "error"]
    text = "\n".join(
        output.get("text", "") + output.get("data", {}).get("text/plain", "") for output in outputs
    )
    assert all(name in text for name in MODELS)  # the comparison table
    assert "over the pooling baseline" in text
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 5  # the plots
    assert "nothing of this model was promoted before" in text  # the promotion report
    explanations = [o for o in outputs if "ranks" in o.get("data", {}).get("text/markdown", "")]
    assert explanations
    ranking = notebook.cells[-1]["outputs"][-1]["data"]["text/plain"]
    assert "click_probability" in ranking and ranking.count("\n") >= 10  # 10 scored candidates
