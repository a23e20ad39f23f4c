"""--workers N in the layer path: the weight quantization of a layer's experts on N local processes gives the
checkpoint of one process, byte for byte (every file, manifest included)."""

from pathlib import Path

import numpy as np
import pytest

import goldstick
from goldstick.engine.executors import InlineExecutor
from goldstick.engine.weight_units import StoredWeight, quantize_stored, quantize_weight_unit, quantize_weights
from goldstick.io.checkpoint import CheckpointReader
from goldstick.quant.numerics import quantize_weight
from goldstick.testing.make_model import make_model

DYNAMIC = "deepseek-r1-w8a8-dynamic"  # every linear a weight unit; path="layers": calibrated, not streamed
REPO = Path(__file__).resolve().parents[1]
FAST = dict(calib_samples=2, calib_seq_len=32, progress=False, path="layers")


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("m") / "fp8", size="tiny", fp8=True)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_two_workers_give_one_workers_bytes(fp8_model, tmp_path):
    one = goldstick.quantize(fp8_model, DYNAMIC, out=tmp_path / "one", executor="inline", **FAST).out
    two = goldstick.quantize(fp8_model, DYNAMIC, out=tmp_path / "two", executor="local", workers=2, **FAST).out
    a, b = _files(one), _files(two)
    assert sorted(a) == sorted(b)
    assert [n for n in a if a[n] != b[n]] == []


def test_stored_units_are_the_float_weights_quantization(fp8_model):
    """An FP8 weight quantized from its codes (kernels) equals quantize_weight of the decoded float32 weight."""
    reader = CheckpointReader(fp8_model)
    names = [n for n in reader.layer_tensor_names(1) if ".experts." in n and n.endswith("proj.weight")][:6]
    for name in names:
        q, s = quantize_stored(reader, name, "absmax127")
        rq, rs = quantize_weight(reader.read(name), "absmax127")
        assert np.array_equal(q, rq) and np.array_equal(s, rs)
        uq, us = quantize_weight_unit(StoredWeight(str(fp8_model), name, "absmax127"))
        assert np.array_equal(uq, q) and np.array_equal(us, s)


def test_small_layers_stay_in_process(fp8_model):
    """Below the executor's min_params the units run here (no worker start-up for small layers)."""
    class Refusing(InlineExecutor):
        min_params = 1 << 40

        def imap_unordered(self, fn, units, max_in_flight=None):
            raise AssertionError("small work went to the executor")

    from goldstick.engine.inputs import LayerTensors

    reader = CheckpointReader(fp8_model)
    names = [n for n in reader.layer_tensor_names(1) if ".experts.0." in n and n.endswith("proj.weight")]
    done = quantize_weights(names, LayerTensors(reader, 1), None, Refusing(), "absmax127")
    assert len(done) == 3 and all(q.dtype == np.int8 for q, _ in done)


@pytest.mark.slow
def test_ray_statistics_split_gives_one_workers_bytes(fp8_model, tmp_path, monkeypatch):
    """--executor ray: each layer's calibration batches split across 2 Ray actors (and the weight units on Ray
    tasks); the per-channel statistics reduce exactly, so the checkpoint is the inline run's, byte for byte. The
    mixed recipe's static o_proj makes the actors run the whole attention with hooks."""
    ray = pytest.importorskip("ray")
    from goldstick.engine.executors import RayExecutor
    from goldstick.engine.statistics import RayStatistics

    calib = dict(calib_samples=130, calib_seq_len=32, progress=False)  # forward batches of 128 and 2 sequences
    recipe = tmp_path / "mixed-small-search.yaml"  # the mixed recipe with a 2-point OS+ grid on 128 tokens
    recipe.write_text((REPO / "recipes" / "deepseek-r1-w8a8-mixed.yaml").read_text()
                      .replace("osplus_grid: 20", "osplus_grid: 2").replace("token_sample: 1024", "token_sample: 128"))
    split_layers = []
    observe = RayStatistics.observe

    def counted(self, cfg, index, *args):
        split_layers.append((index, len(self.actors)))
        return observe(self, cfg, index, *args)
    monkeypatch.setattr(RayStatistics, "observe", counted)
    one = goldstick.quantize(fp8_model, recipe, out=tmp_path / "one", executor="inline", **calib).out
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with RayExecutor() as ex:
            assert ex.workers == 2
            split = goldstick.quantize(fp8_model, recipe, out=tmp_path / "ray", executor=ex, **calib).out
    finally:
        ray.shutdown()
    assert split_layers == [(i, 2) for i in range(4)]
    a, b = _files(one), _files(split)
    assert sorted(a) == sorted(b)
    assert [n for n in a if a[n] != b[n]] == []
