"""Golden-Stick's own A16W8 weight quantization, run through its PTQ flow on CPU (test helper).

Used by ``tests/test_gs_bitexact.py`` only when ``mindspore_gs`` (Golden-Stick, mindspore-gs 1.4.1) is importable.
Importing this module imports ``mindspore_gs``.

What :func:`gs_quantize_a16w8` does (see notes mindspore-cpu.md §8 and golden-stick.md §4.2):

* It builds a tiny network with a single decoder layer. The layer holds one ``mint.nn.Linear`` per input matrix,
  and the matrix is loaded as that layer's ``weight [out, in]``.
* It wraps the network in a minimal ``BaseQuantForCausalLM`` (the ``mindone`` framework path needs
  ``network``, ``forward(item)``, ``_transformer_layers()`` and ``get_layers_for_smooth()``).
* It registers the mindone quant cells and algorithm modules by calling ``MindOneModelHubPlugin._load_quant_cells``
  and ``_load_algo_modules`` unbound. The plugin's constructor would demand the ``mindone`` package, which the
  methods themselves do not use.
* It runs ``PTQ(PTQConfig(mode=QUANTIZE, backend=NONE, weight_quant_dtype=int8)).apply(model, datasets=...,
  framework="mindone")`` on a 2-sample Hugging Face ``Dataset``. The config is weight-only int8, per channel,
  symmetric, not narrow range (the GS defaults). Every Linear becomes a ``WeightQuantLinearCell``. Its ``quant()``
  calls ``basic_quant_func.quant_tensor`` (per-row min/max, ``cal_quantization_params``, ``quant_tensor_data``).
* It then reads back the ``weight`` (int8), ``weight_scale`` (float32, the weight dtype) and ``weight_offset``
  (int32) parameters that PTQ created.

Side effects that are contained here:

* goldstick's ``setup_mindspore()`` is called first. MindSpore's device can be set only before the first kernel
  runs, and the rest of the suite relies on it.
* ``PTQ._check_apply_inputs`` sets ``os.environ['ENFORCE_EAGER'] = 'true'``. The previous value is restored.
* The quant-cell and algorithm registrations are class-level state in ``mindspore_gs``. They are done once per
  process.
* GS's logger calls ``inspect.stack()`` for every message, even those it filters out. At pytest stack depths that
  costs most of the PTQ run's time. ``quiet_gs_logger`` swaps only the caller lookup for a cheap one while PTQ
  runs. It touches no quantization code.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

import mindspore as ms
import mindspore_gs
import numpy as np
from mindspore import Tensor, mint, nn
from mindspore_gs.common import BackendTarget
from mindspore_gs.ptq import PTQ, PTQConfig, PTQMode
from mindspore_gs.ptq.models.base_model import BaseQuantForCausalLM
from mindspore_gs.ptq.plugins.mindone_plugin import MindOneModelHubPlugin

from goldstick.model.runtime import setup_mindspore

GS_VERSION = mindspore_gs.__version__

_registered = False


def _register_mindone_cells() -> None:
    """Register the mindone quant cells and PTQ pipeline stages, once per process."""
    global _registered
    if _registered:
        return
    # Unbound on purpose: the constructor requires the mindone package; these two methods do not use self.
    MindOneModelHubPlugin._load_quant_cells(None)  # pylint: disable=protected-access
    MindOneModelHubPlugin._load_algo_modules(None)  # pylint: disable=protected-access
    _registered = True


@contextlib.contextmanager
def quiet_gs_logger():
    """Make GS's per-message caller lookup cheap while PTQ runs. Only logging is affected."""
    gs_logger_module = importlib.import_module("mindspore_gs.common.logger")  # the module, not the instance
    original = gs_logger_module._find_real_caller  # pylint: disable=protected-access
    logger_file = os.path.normcase(gs_logger_module.__file__)

    def cheap_caller():
        frame = sys._getframe(1)  # pylint: disable=protected-access
        while frame is not None and os.path.normcase(frame.f_code.co_filename) == logger_file:
            frame = frame.f_back
        if frame is None:
            return "unknown", 0, "unknown", None
        return frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name, None

    gs_logger_module._find_real_caller = cheap_caller  # pylint: disable=protected-access
    try:
        yield
    finally:
        gs_logger_module._find_real_caller = original  # pylint: disable=protected-access


@contextlib.contextmanager
def _restore_env(*names):
    saved = {n: os.environ.get(n) for n in names}
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


class ProbeDecoderLayer(nn.Cell):
    """One decoder layer: every matrix is a bias-free ``mint.nn.Linear``, fed a slice of the hidden state."""

    def __init__(self, weights, hidden):
        super().__init__()
        self.in_features = []
        self.names = []
        for i, w in enumerate(weights):
            out_f, in_f = w.shape
            if in_f > hidden:
                raise ValueError(f"matrix {i}: in_features {in_f} > hidden {hidden}")
            lin = mint.nn.Linear(in_f, out_f, bias=False)
            lin.weight.set_data(Tensor(np.ascontiguousarray(w, dtype=np.float32)))
            name = f"m{i}"
            self.insert_child_to_cell(name, lin)
            self.in_features.append(in_f)
            self.names.append(name)

    def construct(self, hidden_states):
        out = hidden_states
        for name, in_f in zip(self.names, self.in_features):
            y = getattr(self, name)(hidden_states[..., :in_f])
            # every Linear must run so that the PTQ hooks see it; keep the residual stream's shape
            out = out + mint.mean(y, dim=-1, keepdim=True) * 1e-3
        return out


class ProbeNet(nn.Cell):
    def __init__(self, weights, hidden, vocab=32, seed=0):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)  # mint.nn.Embedding has no CPU kernel
        table = np.random.default_rng(seed).standard_normal((vocab, hidden)).astype(np.float32) * 0.1
        self.embed.embedding_table.set_data(Tensor(table))
        self.layers = nn.CellList([ProbeDecoderLayer(weights, hidden)])

    def construct(self, input_ids):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return h


class ProbeQuantModel(BaseQuantForCausalLM):
    """The smallest ``BaseQuantForCausalLM`` that ``PTQ.apply(..., framework='mindone')`` accepts."""

    def __init__(self, network):
        self.network = network

    def forward(self, input_ids, max_new_tokens=1):  # PTQ passes one dataset row (a dict)
        ids = input_ids["input_ids"] if isinstance(input_ids, dict) else input_ids
        return self.network(Tensor(np.asarray(ids, dtype=np.int32)[None]))

    def _transformer_layers(self):
        return [ProbeDecoderLayer]

    def get_layers_for_smooth(self, decoder_layer):  # no smoothing in A16W8
        return []


def gs_quantize_a16w8(weights):
    """Quantize each float32 ``[out, in]`` matrix with Golden-Stick's PTQ A16W8 (per-channel int8).

    Returns one ``(q int8 [out, in], scale float32 [out], offset int32 [out], dtypes)`` per matrix, read from the
    PTQ-produced ``weight`` / ``weight_scale`` / ``weight_offset`` parameters. ``dtypes`` holds the three parameter
    dtypes as strings.
    """
    from datasets import Dataset

    weights = [np.asarray(w, dtype=np.float32) for w in weights]
    hidden = max(w.shape[1] for w in weights)
    # goldstick's own one-time MindSpore set-up (CPU device, PyNative, blocking launch). It must come before the
    # first kernel runs in this process; otherwise every later ms.set_device("CPU") in the suite raises.
    setup_mindspore()
    _register_mindone_cells()

    prev_mode = ms.get_context("mode")
    if prev_mode != ms.PYNATIVE_MODE:  # PTQ QUANTIZE refuses graph mode
        ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        with _restore_env("ENFORCE_EAGER"), quiet_gs_logger():
            net = ProbeNet(weights, hidden)
            cfg = PTQConfig(mode=PTQMode.QUANTIZE, backend=BackendTarget.NONE, weight_quant_dtype=ms.int8)
            ptq = PTQ(cfg)
            ds = Dataset.from_dict({"input_ids": [[1, 5, 9, 2, 7, 3], [4, 4, 0, 31, 8, 6]]})
            ptq.apply(ProbeQuantModel(net), datasets=ds, framework="mindone")
    finally:
        if prev_mode != ms.PYNATIVE_MODE:
            ms.set_context(mode=prev_mode)

    params = dict(net.parameters_and_names())
    results = []
    for i in range(len(weights)):
        prefix = f"layers.0.m{i}."
        missing = [k for k in ("weight", "weight_scale", "weight_offset") if prefix + k not in params]
        if missing:
            raise RuntimeError(f"GS PTQ did not produce {missing} for {prefix!r}; got {sorted(params)}")
        w_p, s_p, o_p = (params[prefix + k] for k in ("weight", "weight_scale", "weight_offset"))
        results.append((w_p.asnumpy(), s_p.asnumpy(), o_p.asnumpy(), (str(w_p.dtype), str(s_p.dtype), str(o_p.dtype))))
    return results
