"""Notebooks: progress bars are tqdm.auto everywhere, and examples/smollm2_depth.ipynb runs on the bundled model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_progress_bars_are_tqdm_auto():
    plain = [str(p.relative_to(ROOT)) for p in (ROOT / "src").rglob("*.py")
             if re.search(r"^\s*(from tqdm import|import tqdm\b)", p.read_text(), re.MULTILINE)]
    assert plain == [], f"use 'from tqdm.auto import tqdm' (widgets in Jupyter, text in a terminal): {plain}"


@pytest.mark.slow  # a kernel start and SmolLM2 on 2x64 tokens: ~30-60 s on 2 cores
def test_example_notebook_runs_on_the_bundled_model():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = nbformat.read(ROOT / "examples" / "smollm2_depth.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any(h.startswith("<div><b>VarianceProfile</b>") for h in html)  # the result's own summary
    assert any("image/png" in o.get("data", {}) for o in outputs)  # profile.plot() rendered
    last = notebook.cells[-1].outputs[0]["data"]["text/plain"]
    assert "angular_distance" in last and len(last.splitlines()) >= 5
