"""What keeps the layer path's host memory down (benchmarks/vs_msmodelslim.py reports its peak RSS).

* A layer-path process imports no numba (about 50 MB of RSS, and 30 MB more to load its cached code): the layer
  path computes with numpy, goldstick.quant.kernels imports numba only for a kernel, and goldstick.testing.make_model
  only for ``--size r1``.
* On CPU a linear's output is not a MindSpore view: ``asnumpy()`` of a view copies it into a new block of the memory
  pool, which keeps its peak for the life of the process (the final logits of a calibration batch: +50 MB).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from goldstick.testing.make_model import default_model_path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("numba", "llvmlite", "datasets", "pyarrow")  # none is needed to quantize from a .jsonl calibration set


@pytest.mark.slow
def test_the_layer_path_imports_no_numba(tmp_path):
    """The benchmark's command (W8A8 mixed, ascend format, .jsonl calibration), smaller, in a fresh process."""
    args = ["quantize", "deepseek-r1-w8a8-mixed", "--model", str(default_model_path()), "--out", str(tmp_path / "q"),
            "--format", "ascend", "--calib", str(REPO / "calibration" / "mixed-zh-en.jsonl"), "--calib-samples", "8",
            "--calib-seq-len", "64", "--no-progress"]
    code = (f"import sys\nfrom goldstick.cli import main\nassert main({args!r}) == 0\n"
            f"print('imported:', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "imported: []", run.stdout


def test_linear_outputs_read_without_a_copy():
    from mindspore import Tensor

    from goldstick.model.network import Linear, StreamedLinear
    from goldstick.model.runtime import setup_mindspore

    setup_mindspore()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    w = rng.standard_normal((5, 8)).astype(np.float32)
    linear = Linear(8, 5)
    linear.weight.set_data(Tensor.from_numpy(w))
    for cell in (linear, StreamedLinear(8, 5, lambda: w)):
        y = cell(Tensor.from_numpy(x))
        assert y.shape == (2, 3, 5)
        assert np.shares_memory(y.asnumpy(), y.asnumpy())  # a view's asnumpy() would copy it each time
        assert np.allclose(y.asnumpy(), x @ w.T, rtol=1e-5, atol=1e-5)
