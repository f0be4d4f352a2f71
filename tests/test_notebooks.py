"""The notebooks run top to bottom, headless, on small settings (so they never rot), and the saved
copies carry their outputs (so they read without running)."""

import json
import os
import sys

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")


@pytest.fixture(autouse=True)
def kernel_of_this_python(tmp_path, monkeypatch):
    """A kernel spec that runs this very interpreter (the test's virtual environment), whatever
    kernels the machine has registered."""
    spec = tmp_path / "kernels" / "nanomile-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "nanoMiLe tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))  # searched before the user's and the system's


def execute(name):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="nanomile-test", resources={"metadata": {"path": NOTEBOOKS}}).execute()
    return nb  # an exception in any cell has raised CellExecutionError by now


def outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


@pytest.mark.parametrize("name", ["01_mile_explained.ipynb", "02_bucket_analysis.ipynb"])
def test_saved_notebook_has_its_outputs(name):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code)
    assert not [o for o in outputs(nb) if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs(nb))


def test_mile_explained_runs():
    nb = execute("01_mile_explained.ipynb")
    assert any("image/png" in o.get("data", {}) for o in outputs(nb))


def test_bucket_analysis_runs_on_a_comparison(compared, monkeypatch):
    out, _ = compared
    monkeypatch.setenv("NANOMILE_COMPARE_DIR", str(out))  # the kernel inherits the environment
    monkeypatch.setenv("NANOMILE_EVAL_ITERS", "3")
    nb = execute("02_bucket_analysis.ipynb")
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs(nb))
    assert "mile" in text.lower() and sum("image/png" in o.get("data", {}) for o in outputs(nb)) >= 3
