"""Runs examples/quickstart.ipynb end to end, at 2 epochs, in a Jupyter kernel."""

import ast
import json
import pathlib
import sys

import pytest

NOTEBOOK = pathlib.Path(__file__).parents[1] / "examples" / "quickstart.ipynb"


def _use_this_interpreter(tmp_path, monkeypatch):
    """Makes the `python3` kernel run `sys.executable`.

    A kernelspec on JUPYTER_PATH takes precedence over a user-level `python3`
    kernel, which may belong to another interpreter without galkeras.
    """
    kernel_dir = tmp_path / "jupyter" / "kernels" / "python3"
    kernel_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (galkeras tests)",
        "language": "python",
    }
    (kernel_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))


@pytest.mark.large
def test_quickstart_notebook(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    _use_this_interpreter(tmp_path, monkeypatch)
    # The kernel inherits these: a tiny run on CPU, quiet TensorFlow, and the
    # notebook's tempfile.mkdtemp() export under tmp_path.
    monkeypatch.setenv("GALKERAS_NB_EPOCHS", "2")
    monkeypatch.setenv("GALKERAS_NB_WARMUP", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("TMPDIR", str(tmp_path))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    # The notebook is committed without outputs, and its first code cell holds
    # the settings.
    assert all(not c.outputs and c.execution_count is None for c in code_cells)
    assert code_cells[0].metadata.get("tags") == ["parameters"]
    code_cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))
    nb.cells.append(code_cells[-1])

    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # Raises CellExecutionError if a cell fails.

    outputs = [output for cell in code_cells for output in cell.outputs]
    text = "".join(o.text for o in outputs if o.output_type == "stream")
    lines = text.splitlines()
    assert lines[-1] == sys.prefix  # the kernel ran this interpreter
    assert "Epoch 2/2" in text
    # The noisy-label samples, then the accuracy and agreement curves.
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 2
    assert "student_accuracy:" in text
    assert "θC predictions (359, 10)" in text
    served = next(line for line in lines if line.startswith("exported class names:"))
    names = ast.literal_eval(served.split(":", 1)[1].strip())
    assert len(names) == 8 and set(names) <= {str(digit) for digit in range(10)}
    assert len(list(tmp_path.glob("*/digits_gal/1/saved_model.pb"))) == 1
