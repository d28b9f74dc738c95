"""docs/notebooks/walkthrough.ipynb is committed without outputs (tests/client/test_workflow.py
runs it against the live box with nbclient)."""

from __future__ import annotations

import json

from tests.client.conftest import ROOT

NOTEBOOK = ROOT / "docs" / "notebooks" / "walkthrough.ipynb"


def test_the_notebook_is_committed_without_outputs():
    notebook = json.loads(NOTEBOOK.read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
