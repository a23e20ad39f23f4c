"""The example notebook runs top to bottom (so it never goes stale)."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "w8a8-static+osplus" in outputs and "KL" in outputs
    removed = [line.split("removed ", 1)[1] for line in outputs.splitlines() if line.startswith("removed ")]
    assert len(removed) == 1 and not Path(removed[0]).exists()  # the last cell cleans up its temporary folder
