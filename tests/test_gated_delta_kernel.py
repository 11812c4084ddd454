"""The gated delta rule's chunk-scan kernels (``pallas_kernels/gated_delta/kernel.py``, GPU-style
Triton, and ``kernel_tpu.py``, Mosaic TPU), run in interpret mode, equal the scan contract's
references: ``scan_fwd`` == ``scan_fwd_reference`` (output, chunk-entry states, final state) and
``scan_bwd`` == ``scan_bwd_reference`` (all seven gradients), in float32 and bfloat16, with the
delta correction ``w`` and without (linear attention), on shapes that pad every axis and split
the value columns into several tiles. (Lowering for the accelerators: ``test_kernel_lowering.py``.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.gated_delta import scan_bwd_reference, scan_fwd_reference
from pallas_kernels.gated_delta.kernel import BlockSizes, scan_bwd, scan_fwd
from pallas_kernels.gated_delta.kernel_tpu import TpuBlockSizes, scan_bwd_tpu, scan_fwd_tpu

# per input dtype: the largest error allowed, relative to max(1, the reference's largest
# magnitude), of every output and gradient. bf16: the kernels' products take the state, vn and
# dS cast to bf16 (the reference computes in float32), about 2**-8 relative per product.
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
FWD_NAMES = ("o", "states", "s_final")
BWD_NAMES = ("dqg", "dkd", "dw", "du", "da", "de", "ds0")

# (forward, backward, keywords): GPU value tiles of 16 columns, TPU of 128, so V = 130 makes
# several tiles on both (partials summed over tiles)
KERNELS = {
    "pallas": (scan_fwd, scan_bwd, dict(block_sizes=BlockSizes(block_v=16, block_v_bwd=16))),
    "pallas_tpu": (scan_fwd_tpu, scan_bwd_tpu, dict(block_sizes=TpuBlockSizes())),
}


def _inputs(b, n, x, t, h, v, seed, dtype=jnp.float32, with_w=True):
    """Scan operands of the magnitudes the chunked form produces: unit-norm-ish keys and queries,
    lower-triangular intra-chunk weights, decays in (0, 1]; cotangents for the backward."""
    ks = jax.random.split(jax.random.key(seed), 9)
    normal = lambda k, shape, scale=1.0: jax.random.normal(k, shape) * scale  # noqa: E731
    mat = lambda k: normal(k, (b, n, x, t, h), h ** -0.5).astype(dtype)  # noqa: E731
    a = jnp.tril(normal(ks[4], (b, n, x, t, t), 0.3)).astype(dtype)
    return dict(qg=mat(ks[0]), kd=mat(ks[1]), w=mat(ks[2]) if with_w else None,
                u=normal(ks[3], (b, n, x, t, v)).astype(dtype), a=a,
                e=jnp.exp(-jax.random.uniform(ks[5], (b, n, x, h))),
                s0=normal(ks[6], (b, n, h, v)), do=normal(ks[7], (b, n, x, t, v)),
                ds_final=normal(ks[8], (b, n, h, v)))


def _scan(fwd, bwd, ins, jit=True, **kw):
    """Forward outputs, and the backward's given the reference's chunk-entry states (so each pass
    is tested on its own), in one jit (or op by op)."""
    def run(ins, states):
        chunk = (ins["qg"], ins["kd"], ins["w"], ins["u"], ins["a"], ins["e"])
        return (fwd(*chunk, ins["s0"], **kw),
                bwd(*chunk, states, ins["do"], ins["ds_final"], **kw))

    chunk = (ins["qg"], ins["kd"], ins["w"], ins["u"], ins["a"], ins["e"])
    ref_states = scan_fwd_reference(*chunk, ins["s0"])[1]
    return (jax.jit(run) if jit else run)(ins, ref_states)


def _check(kernel, ins, dtype=jnp.float32, eager=False):
    ref_fwd, ref_bwd = _scan(scan_fwd_reference, scan_bwd_reference, ins)
    fwd, bwd, kw = KERNELS[kernel]
    got_fwd, got_bwd = _scan(fwd, bwd, ins, jit=not eager, interpret=True, **kw)
    tol = TOL[dtype]
    for name, got, ref in zip(FWD_NAMES + BWD_NAMES, (*got_fwd, *got_bwd), (*ref_fwd, *ref_bwd),
                              strict=True):
        if ref is None:  # dw without w
            assert got is None, name
            continue
        assert got.shape == ref.shape and got.dtype == jnp.float32, (name, got.shape, got.dtype)
        got, ref = np.asarray(got), np.asarray(ref)
        assert np.all(np.isfinite(got)), name
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(got, ref, atol=tol * scale, rtol=0, err_msg=f"{kernel} {name}")


@pytest.mark.parametrize("with_w", [True, False], ids=["delta", "linear"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernels_equal_the_references(kernel, dtype, with_w):
    # T = 6, H = 5, V = 130 pad on both backends; three chunks; two heads. The float32 linear
    # case runs op by op (eagerly), the others under jit.
    _check(kernel, _inputs(1, 2, 3, 6, 5, 130, 0, dtype, with_w), dtype,
           eager=dtype == jnp.float32 and not with_w)


@pytest.mark.parametrize("with_w", [True, False], ids=["delta", "linear"])
@pytest.mark.parametrize("kernel", list(KERNELS))
@settings(max_examples=2, deadline=None, derandomize=True)
@given(b=st.integers(1, 2), n=st.integers(1, 2), x=st.integers(1, 4), t=st.integers(1, 17),
       h=st.integers(1, 20), v=st.integers(1, 20), seed=st.integers(0, 2 ** 16))
def test_kernels_match_the_references_hypothesis(kernel, with_w, b, n, x, t, h, v, seed):
    _check(kernel, _inputs(b, n, x, t, h, v, seed, with_w=with_w))


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_forward_without_states_writes_the_same_output(kernel):
    fwd, _, kw = KERNELS[kernel]
    ins = _inputs(1, 1, 2, 4, 3, 20, 1)
    chunk = [ins[k] for k in ("qg", "kd", "w", "u", "a", "e")]
    o, states, s_final = fwd(*chunk, ins["s0"], interpret=True, **kw)
    o2, none, s_final2 = fwd(*chunk, ins["s0"], interpret=True, with_states=False, **kw)
    assert none is None
    np.testing.assert_array_equal(np.asarray(o2), np.asarray(o))
    np.testing.assert_array_equal(np.asarray(s_final2), np.asarray(s_final))


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_scan_shapes_are_checked(kernel):
    fwd, bwd, _ = KERNELS[kernel]
    ins = _inputs(1, 1, 2, 4, 3, 5, 0)
    chunk = [ins[k] for k in ("qg", "kd", "w", "u", "a", "e")]
    bad_e = chunk[:5] + [ins["e"][..., :2]]
    with pytest.raises(ValueError, match=r"e must have shape \(1, 1, 2, 3\)"):
        fwd(*bad_e, ins["s0"], interpret=True)
    with pytest.raises(ValueError, match=r"state must have shape \(1, 1, 3, 5\)"):
        fwd(*chunk, ins["s0"][..., :4], interpret=True)
    with pytest.raises(ValueError, match=r"do must have shape \(1, 1, 2, 4, 5\)"):
        bwd(*chunk, ins["s0"][:, :, None].repeat(2, 2), ins["do"][..., :4], ins["ds_final"],
            interpret=True)
    with pytest.raises(ValueError, match=r"u must be 5-D, \(B, N, X chunks, T, V\), got shape \(2, 4, 5\)"):
        fwd(*chunk[:3], ins["u"][0, 0], *chunk[4:], ins["s0"], interpret=True)
    with pytest.raises(TypeError, match="floating point"):
        fwd(*chunk[:3], ins["u"].astype(jnp.int32), *chunk[4:], ins["s0"], interpret=True)


def test_tpu_value_tiles_must_fill_lanes():
    ins = _inputs(1, 1, 1, 4, 3, 5, 0)
    chunk = [ins[k] for k in ("qg", "kd", "w", "u", "a", "e")]
    with pytest.raises(ValueError, match="multiple of 128 columns, got block_v=64"):
        scan_fwd_tpu(*chunk, ins["s0"], interpret=True, block_sizes=TpuBlockSizes(block_v=64))

