"""``examples/fleet.ipynb`` runs top to bottom in a real kernel against a sandbox fleet it starts itself."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import nbclient  # the test extra brings these, matplotlib and ipykernel
import nbformat
import pytest

from fleetctl.sandbox import Sandbox
from tests.conftest import require_sshd

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "fleet.ipynb"
KERNEL = "fleetctl-test"


def _kernelspec(root: Path) -> Path:
    """A kernel for this interpreter (the project's venv), found first through JUPYTER_PATH: a
    user's or the system's own ``python3`` kernel might be another Python without fleetctl."""
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fleetctl tests", "language": "python"}))
    return root


def _outputs(notebook: Any) -> list[dict[str, Any]]:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


@pytest.mark.timeout(180)
def test_notebook_runs_top_to_bottom_and_draws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_sshd()
    monkeypatch.setenv("JUPYTER_PATH", str(_kernelspec(tmp_path / "jupyter")))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's scratch dir (and sandbox) land here
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name=KERNEL, timeout=120,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    try:
        client.execute()  # raises CellExecutionError, naming the cell, on any error
    finally:
        for state in tmp_path.glob("fleetctl-notebook-*/sandbox/sandbox.json"):
            Sandbox.load(state.parent).down()  # a failed cell must not leave sshd running
    outputs = _outputs(notebook)
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3, "utilization, memory and power plots"
    pages = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("gpu-3" in page and "via" in page for page in pages)  # the Fleet's own table
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "succeeded on" in text and "hello from" in text
    assert not list(tmp_path.glob("fleetctl-notebook-*")), "the last cell removes its scratch dir"
