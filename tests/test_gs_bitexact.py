"""Optional: our ``mode="gs"`` weight quantization is bit-exact with Golden-Stick's own (mindspore-gs).

Runs only where ``mindspore_gs`` can be imported. Without it the whole module is skipped. To use a wheel installed
outside the venv (``pip install --no-deps --target DIR mindspore_gs-1.4.1-py3-none-any.whl prettytable wcwidth``),
point ``GOLDSTICK_GS_PATH`` at DIR. DIR is then put on ``sys.path``, and a failed import is an error, not a skip.

The Golden-Stick side is its real PTQ flow, not a re-implementation: ``PTQ(PTQConfig(mode=QUANTIZE, backend=NONE,
weight_quant_dtype=int8)).apply(model, datasets, framework="mindone")`` on a one-decoder-layer network of
``mint.nn.Linear`` cells (A16W8, per-channel, symmetric; GS defaults otherwise). We read back the ``weight``
(int8), ``weight_scale`` (float32) and ``weight_offset`` (int32) parameters it creates. Inside, GS runs
``WeightQuantLinearCell.quant`` → ``basic_quant_func.quant_tensor``. ``tests/gs_reference.py`` has the driver,
the ``BaseQuantForCausalLM`` shim and the side-effect handling.

We compare against ``goldstick.quant.algorithms.quantize_weight_per_channel(w, mode="gs")``. For every row where GS's
result is defined, the int8 codes must be equal and the float32 scales must have identical bits. The matrices are
seeded random float32 matrices of several shapes and distributions. Each also contains these awkward rows:

* an all-zero row. GS computes scale 0 and then 0/0 = NaN, so its int8 code there is whatever a NaN casts to.
  Such a row is not compared. We only require ours to be finite: scale 1 and q 0;
* a single huge value among small ones, with either sign;
* negative-dominated rows, where ``min = -absmax`` (→ -128);
* exact ±absmax ties: +absmax goes to 127.5, which rint makes 128, clipped to 127; -absmax goes to -128;
* constant rows of either sign;
* a "half grid" row, where the scale is a power of two and every ``w/scale`` is an exact ``k + 0.5``. This pins the
  rounding to half-to-even; ``ms.ops.round`` and ``np.rint`` must agree;
* rows of tiny (1e-30) and very large (1e20) magnitude.

Rows whose float32 scale would be subnormal (absmax < ~1.5e-36) are left out on purpose. GS keeps the subnormal
scale, but on MindSpore CPU its ``w / scale`` then depends on what ran before it in the process. Alone, such a row
quantizes correctly. After a few other PTQ linears it comes out as all -128, which looks like denormals flushed to
zero (0/0). Ours clamps the scale to float32 ``tiny`` instead.

A separate test pins GS's whole-tensor quirk, which we deliberately do not reproduce (see the
``quantize_weight_per_channel`` docstring): when *every* row of a matrix is constant, GS uses scale 1.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

GS_PATH_ENV = "GOLDSTICK_GS_PATH"

_gs_path = os.environ.get(GS_PATH_ENV)
if _gs_path:
    # An explicit GS install was asked for: a broken one must fail, not skip.
    if not os.path.isdir(os.path.join(_gs_path, "mindspore_gs")):
        raise RuntimeError(f"{GS_PATH_ENV}={_gs_path!r} does not contain a mindspore_gs package")
    if _gs_path not in sys.path:
        sys.path.insert(0, _gs_path)
    import mindspore_gs  # noqa: F401  pylint: disable=unused-import
else:
    pytest.importorskip("mindspore_gs")

import gs_reference  # noqa: E402  (imports mindspore_gs)

from goldstick.quant.algorithms import quantize_weight_per_channel  # noqa: E402

SHAPES = [(24, 64), (40, 96), (32, 128), (20, 160), (48, 40), (16, 160), (36, 72), (28, 100)]
SEEDS = list(range(len(SHAPES)))


def _awkward_rows(rng, n_in):
    """Named rows that stress the edges of the formula (each row is float32 [n_in])."""
    small = lambda: (rng.standard_normal(n_in) * 0.01).astype(np.float32)  # noqa: E731
    rows = {"zero": np.zeros(n_in, np.float32)}

    r = small()
    r[rng.integers(n_in)] = 1.0e3
    rows["single_huge_pos"] = r
    r = small()
    r[rng.integers(n_in)] = -7.5e2
    rows["single_huge_neg"] = r

    r = -np.abs(rng.standard_normal(n_in)).astype(np.float32) * 0.05
    r[rng.integers(n_in, size=3)] = np.float32(0.001)  # a few small positives
    rows["negative_dominated"] = r
    r = -np.abs(rng.standard_normal(n_in)).astype(np.float32)
    rows["all_negative"] = r

    r = (rng.standard_normal(n_in) * 0.02).astype(np.float32)
    a = np.float32(np.abs(r).max() * 1.25)
    idx = rng.permutation(n_in)
    r[idx[:3]] = a
    r[idx[3:6]] = -a
    rows["pm_absmax_ties"] = r
    r = (rng.standard_normal(n_in) * 0.02).astype(np.float32)
    a = np.float32(np.abs(r).max() * 2.0)
    r[idx[:4]] = -a
    rows["neg_absmax_ties"] = r

    rows["constant_pos"] = np.full(n_in, 0.037, np.float32)
    rows["constant_neg"] = np.full(n_in, -0.037, np.float32)

    # scale = 2^-7 exactly; w / scale = k/2 for odd k, all exact half-integers.
    s = 2.0 ** -7
    k = rng.integers(-127, 128, size=n_in) * 2 + 1
    k = np.clip(k, -255, 255)
    k[0] = 255  # absmax = 127.5 * s
    rows["half_grid"] = (k * (s / 2)).astype(np.float32)

    rows["tiny"] = (rng.standard_normal(n_in) * 1e-30).astype(np.float32)
    rows["large"] = (rng.standard_normal(n_in) * 1e20).astype(np.float32)
    return rows


def _random_matrix(seed, shape):
    """Mix of distributions, per-row magnitudes spread over 4 decades, and every awkward row at a random place."""
    rng = np.random.default_rng(1000 + seed)
    n_out, n_in = shape
    kind = seed % 3
    if kind == 0:
        w = rng.standard_normal(shape)
    elif kind == 1:
        w = rng.standard_t(df=2.0, size=shape)  # heavy tails
    else:
        w = rng.uniform(-1.0, 1.0, size=shape)
    w = (w * 10.0 ** rng.uniform(-4.0, 0.0, size=(n_out, 1))).astype(np.float32)
    labels = ["random"] * n_out
    awkward = _awkward_rows(rng, n_in)
    rows = rng.choice(n_out, size=len(awkward), replace=False)
    for row, (label, values) in zip(rows, awkward.items()):
        w[row] = values
        labels[row] = label
    return w, labels


def _all_constant_matrix():
    """Every row constant: GS's whole-tensor ``(max == min).all()`` branch."""
    values = np.array([0.5, -0.25, 3.0, 0.0, -1.75, 0.037], np.float32)
    return np.repeat(values[:, None], 24, axis=1)


@pytest.fixture(scope="module")
def gs_run():
    cases = [(f"seed{seed}_{shape[0]}x{shape[1]}", *_random_matrix(seed, shape)) for seed, shape in zip(SEEDS, SHAPES)]
    weights = [w for _, w, _ in cases] + [_all_constant_matrix()]
    results = gs_reference.gs_quantize_a16w8(weights)
    return cases, results[: len(cases)], results[len(cases)]


def test_gs_ptq_produced_a16w8_parameters(gs_run):
    """PTQ really replaced every Linear, producing int8 weights, float32 scales and zero offsets."""
    cases, results, _ = gs_run
    assert len(results) == len(cases)
    for (name, w, _), (q, scale, offset, dtypes) in zip(cases, results):
        assert dtypes == ("Int8", "Float32", "Int32"), (name, dtypes)
        assert q.shape == w.shape and scale.shape == (w.shape[0],) and offset.shape == (w.shape[0],), name
        assert not offset.any(), f"{name}: symmetric weight quantization should have zero offsets"


def test_gs_mode_bit_exact_with_golden_stick(gs_run):
    cases, results, _ = gs_run
    compared_rows = 0
    compared_awkward = set()
    for (name, w, labels), (q_gs, s_gs, _, _) in zip(cases, results):
        ours = quantize_weight_per_channel(w, mode="gs")
        assert ours.q.dtype == np.int8 and ours.scale.dtype == np.float32
        assert np.isfinite(ours.scale).all() and (ours.scale > 0).all(), name

        # GS is undefined where its scale is 0 (the all-zero row: 0/0 = NaN before the int8 cast) or subnormal
        # (see the module docstring); none of these matrices has a subnormal scale.
        defined = np.isfinite(s_gs) & (s_gs >= np.finfo(np.float32).tiny)
        undefined_labels = {labels[i] for i in np.flatnonzero(~defined)}
        assert undefined_labels <= {"zero"}, f"{name}: GS scale undefined on rows {undefined_labels}"

        bad_scale = np.flatnonzero(defined & (s_gs.view(np.uint32) != ours.scale.view(np.uint32)))
        assert bad_scale.size == 0, (
            f"GS {gs_reference.GS_VERSION} {name}: float32 scale differs on rows {bad_scale.tolist()} "
            f"({[labels[i] for i in bad_scale]}): gs={s_gs[bad_scale].tolist()} ours={ours.scale[bad_scale].tolist()}")
        bad_q = np.argwhere(defined[:, None] & (q_gs != ours.q))
        if bad_q.size:
            r, c = bad_q[0]
            pytest.fail(f"GS {gs_reference.GS_VERSION} {name}: {len(bad_q)} int8 codes differ; "
                        f"first at row {r} ({labels[r]}) col {c}: w={w[r, c]!r} gs={q_gs[r, c]} "
                        f"ours={ours.q[r, c]} scale={s_gs[r]!r}")

        compared_rows += int(defined.sum())
        compared_awkward |= {labels[i] for i in np.flatnonzero(defined)} - {"random"}

    # Guard against a vacuous pass: nearly every row must have been compared, every awkward kind (except zero) too.
    total_rows = sum(w.shape[0] for _, w, _ in cases)
    assert compared_rows == total_rows - len(cases)  # exactly one all-zero row per matrix is skipped
    assert compared_awkward == set(_awkward_rows(np.random.default_rng(0), 8)) - {"zero"}


def test_zero_rows_finite_in_ours(gs_run):
    """GS leaves the all-zero row undefined (scale 0). Ours gives scale 1.0 and q 0, which dequantize to exact zeros."""
    cases, results, _ = gs_run
    for (name, w, labels), (_, s_gs, _, _) in zip(cases, results):
        row = labels.index("zero")
        assert s_gs[row] == 0 or not np.isfinite(s_gs[row]), f"{name}: GS zero-row behaviour changed: {s_gs[row]!r}"
        ours = quantize_weight_per_channel(w, mode="gs")
        assert ours.scale[row] == np.float32(1.0) and not ours.q[row].any(), name
        assert not ours.dequantize()[row].any()


def test_all_constant_matrix_is_a_documented_divergence(gs_run):
    """When every row is constant, GS short-circuits to scale 1 and q = clip(rint(w)). We keep the per-row formula."""
    _, _, (q_gs, s_gs, _, _) = gs_run
    w = _all_constant_matrix()
    np.testing.assert_array_equal(s_gs, np.ones(w.shape[0], np.float32))
    np.testing.assert_array_equal(q_gs, np.clip(np.rint(w), -128, 127).astype(np.int8))
    ours = quantize_weight_per_channel(w, mode="gs")
    nonzero = np.abs(w).max(axis=1) > 0
    np.testing.assert_array_equal(ours.scale[nonzero], (np.abs(w).max(axis=1) / 127.5).astype(np.float32)[nonzero])
    # every element is ±absmax, so it lands on the grid edge (127 or -128, or -127 after float32 rounding)
    np.testing.assert_array_equal(np.abs(ours.q[nonzero].astype(np.int16)).min(axis=1) >= 127, True)
    np.testing.assert_allclose(ours.dequantize(), w, rtol=1.01 / 255)
