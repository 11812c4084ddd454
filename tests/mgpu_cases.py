"""GPU interpret-mode cases of the Mosaic GPU block-sparse and token-sparse kernels, run by
``test_mosaic_gpu.py`` each in a fresh process: ``python tests/mgpu_cases.py NAME``.

Why a process of its own: the interpreter runs every simulated warpgroup as a separately
compiled program whose callbacks block until the other warpgroup reaches a barrier, and those
callbacks run on XLA:CPU's client thread pool, as does the callback that launched the
warpgroups. The pool has one thread per core: on a 2-core machine the launcher and one waiting
warpgroup fill it, the warpgroup they wait for never runs, and the test hangs (about one run in
four here under load). The pool size is fixed when the CPU client is created; the parent gives
this process ``PJRT_NPROC=8`` (XLA's override of the pool size), and the script also turns off
asynchronous dispatch first thing, before any array exists. It runs without the suite's shared
compilation cache.

Each case compares outputs (block-sparse: also the returned logsumexp, with a non-zero
cotangent) and the gradients in q, k, v and the sink against the reference of its op computed
in float32 from the same inputs.
"""

from __future__ import annotations

import os
import sys

import jax

jax.config.update("jax_cpu_enable_async_dispatch", False)  # before the CPU client exists

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.block_sparse import block_sparse_attention_reference  # noqa: E402
from pallas_kernels.block_sparse.mosaic_gpu import block_sparse_attention_mgpu  # noqa: E402
from pallas_kernels.token_sparse import token_sparse_attention_reference  # noqa: E402
from pallas_kernels.token_sparse.mosaic_gpu import token_sparse_attention_mgpu  # noqa: E402

F32 = jnp.float32
# (output / lse atol, gradient atol relative to the largest reference gradient)
TOL = {"float32": (2e-5, 5e-5), "bfloat16": (3e-2, 6e-2), "float16": (4e-3, 8e-3)}


def _segments(b, length, bounds):
    """(B, length) int32 ids: 1, 2, ... between ``bounds``, 0 (padding) after the last."""
    ids = np.zeros((b, length), np.int32)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=False)):
        ids[:, lo:hi] = i + 1
    return jnp.asarray(ids)


CASES = {
    # lengths not multiples of the tiles, padded head widths (40 -> 64, 24 -> 64), GQA groups
    # of two (float32 per-head dK/dV stored from registers), a sink logit, invalid keys
    "f32_causal_gqa_sink": dict(dtype="float32", b=1, t=200, s=200, n=4, kg=2, h=40, vw=24,
                                bk=64, p=0.6, causal=True, sink=True, valid=True),
    "bf16_bidirectional_bk128": dict(dtype="bfloat16", b=2, t=256, s=256, n=2, kg=1, h=64,
                                     vw=64, bk=128, p=0.6, causal=False),
    # fewer queries than keys at explicit positions, a window with sink keys
    "f32_window_positions": dict(dtype="float32", b=1, t=100, s=300, n=2, kg=1, h=32, vw=32,
                                 bk=64, p=0.8, causal=True, window=90, num_sink_keys=5,
                                 positions=True),
    # packed sequences with per-segment sink keys and a window, trailing padding
    "f32_segments_window": dict(dtype="float32", b=1, t=192, s=192, n=2, kg=2, h=32, vw=32,
                                bk=64, p=0.9, causal=True, window=40,
                                segments=(0, 70, 150, 180)),
    # every block selected: most causal blocks take the full-block path
    "f16_causal_full_blocks": dict(dtype="float16", b=1, t=256, s=256, n=1, kg=1, h=64, vw=64,
                                   bk=64, p=1.0, causal=True),
}


def run(name: str) -> None:
    c = dict(CASES[name])
    dtype = jnp.dtype(c.pop("dtype"))
    b, t, s, n, kg, h, vw, bk = (c.pop(x) for x in ("b", "t", "s", "n", "kg", "h", "vw", "bk"))
    ks = jax.random.split(jax.random.key(sum(map(ord, name))), 8)
    q = jax.random.normal(ks[0], (b, t, n, h), dtype)
    k = jax.random.normal(ks[1], (b, s, kg, h), dtype)
    v = jax.random.normal(ks[2], (b, s, kg, vw), dtype)
    keep = jax.random.bernoulli(ks[3], c.pop("p"), (b, kg, t, -(-s // bk)))
    if not c.get("segments"):
        keep = keep.at[:, :, 0].set(False)  # a row that reads nothing
    sink = jax.random.normal(ks[4], (n,)) if c.pop("sink", False) else None
    kw = dict(block_k=bk, causal=c.pop("causal"), window=c.pop("window", None),
              num_sink_keys=c.pop("num_sink_keys", 0))
    if c.pop("valid", False):
        kw["key_valid_BS"] = jax.random.bernoulli(ks[5], 0.85, (b, s))
    if c.pop("positions", False):
        kw.update(q_pos_T=jnp.arange(t, dtype=jnp.int32) + 2 * s // 3,
                  k_pos_S=jnp.arange(s, dtype=jnp.int32))
    if (bounds := c.pop("segments", None)) is not None:
        kw["q_seg_BT"] = kw["k_seg_BS"] = _segments(b, t, bounds)
        kw["k_sink_BS"] = jnp.zeros((b, s), bool).at[:, list(bounds[:-1])].set(True)
    assert not c, c
    g_out = jax.random.normal(ks[6], (b, t, n, vw), F32)
    g_lse = jax.random.normal(ks[7], (b, t, n), F32)

    def grads(fn, *xs):
        def loss(q, k, v, sk):
            out, lse = fn(q, k, v, keep, sink=sk, return_lse=True, **kw)
            lse_term = jnp.where(jnp.isfinite(lse), lse * g_lse, 0.0).sum()
            return (out.astype(F32) * g_out).sum() + lse_term, (out, lse)
        argn = (0, 1, 2, 3) if sink is not None else (0, 1, 2)
        return jax.jit(jax.value_and_grad(loss, argnums=argn, has_aux=True))(*xs, sink)

    (_, (out, lse)), got = grads(block_sparse_attention_mgpu, q, k, v)
    (_, (ref_out, ref_lse)), want = grads(block_sparse_attention_reference,
                                          *(x.astype(F32) for x in (q, k, v)))
    atol, gtol = TOL[dtype.name]
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    np.testing.assert_allclose(f32(out), f32(ref_out), atol=atol, rtol=atol, err_msg="out")
    np.testing.assert_array_equal(np.isfinite(f32(lse)), np.isfinite(f32(ref_lse)))
    fin = np.isfinite(f32(ref_lse))
    np.testing.assert_allclose(f32(lse)[fin], f32(ref_lse)[fin], atol=atol, rtol=atol,
                               err_msg="lse")
    for what, a, r in zip(("dq", "dk", "dv", "dsink")[: len(want)], got, want, strict=True):
        scale = max(1.0, float(np.abs(f32(r)).max()))
        np.testing.assert_allclose(f32(a), f32(r), atol=gtol * scale, err_msg=what)
    print(f"{name}: ok")


TOKEN_CASES = {
    # GQA, a raw window at an offset (fewer queries than keys), widths off the tiles, a sink
    "tok_f32_gqa_window_sink": dict(dtype="float32", b=1, t=130, s=200, n=4, kg=2, h=40, vw=24,
                                    m=24, window=40, sink=True),
    # keys that are the values (CSA), key blocks of 128 (4 words)
    "tok_bf16_shared_kv_wpb4": dict(dtype="bfloat16", b=2, t=256, s=256, n=2, kg=1, h=64,
                                    vw=None, m=64, wpb=4),
    # packed sequences with a window, trailing padding
    "tok_f32_segments_window": dict(dtype="float32", b=1, t=192, s=192, n=2, kg=1, h=32, vw=32,
                                    m=16, window=24, segments=(0, 60, 170, 185)),
    # every visible key selected: the causal interior takes the full-block path
    "tok_f16_every_key": dict(dtype="float16", b=1, t=128, s=128, n=2, kg=2, h=64, vw=64,
                              m=128),
}


def run_token(name: str) -> None:
    c = dict(TOKEN_CASES[name])
    dtype = jnp.dtype(c.pop("dtype"))
    b, t, s, n, kg, h, vw, m = (c.pop(x) for x in ("b", "t", "s", "n", "kg", "h", "vw", "m"))
    ks = jax.random.split(jax.random.key(sum(map(ord, name))), 6)
    q = jax.random.normal(ks[0], (b, t, n, h), dtype)
    k = jax.random.normal(ks[1], (b, s, kg, h), dtype)
    v = None if vw is None else jax.random.normal(ks[2], (b, s, kg, vw), dtype)
    scores = jax.random.uniform(ks[3], (b, t, s))
    visible = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t)
    vals, idx = jax.lax.top_k(jnp.where(visible, scores, -1.0), min(m, s))
    idx = jnp.where(vals < 0, -1, idx)
    sink = jax.random.normal(ks[4], (n,)) if c.pop("sink", False) else None
    kw = {}
    if (window := c.pop("window", None)) is not None:
        kw.update(window=window, window_start=s - t)
    if (bounds := c.pop("segments", None)) is not None:
        kw["q_seg_BT"] = kw["k_seg_BS"] = _segments(b, t, bounds)
    wpb = c.pop("wpb", 2)
    assert not c, c
    g_out = jax.random.normal(ks[5], (b, t, n, h if vw is None else vw), F32)
    argn = (0, 1, 3) if v is None else (0, 1, 2, 3)

    def grads(fn, q, k, v, **extra):
        def loss(q, k, v, sk):
            out = fn(q, k, v, idx, sink=sk, **kw, **extra)
            return (out.astype(F32) * g_out).sum(), out
        wrt = tuple(a if a < 2 or v is not None else a - 1 for a in argn)
        if v is None:
            return jax.jit(jax.value_and_grad(lambda q, k, sk: loss(q, k, None, sk), argnums=wrt,
                                              has_aux=True))(q, k, sink)
        return jax.jit(jax.value_and_grad(loss, argnums=wrt, has_aux=True))(q, k, v, sink)

    (_, out), got = grads(token_sparse_attention_mgpu, q, k, v, words_per_block=wpb)
    (_, ref), want = grads(token_sparse_attention_reference, q.astype(F32), k.astype(F32),
                           None if v is None else v.astype(F32))
    atol, gtol = TOL[dtype.name]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=atol,
                               rtol=atol, err_msg="out")
    names = ("dq", "dkv", "dsink") if v is None else ("dq", "dk", "dv", "dsink")
    for what, a, r in zip(names[: len(want)], got, want, strict=True):
        a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
        np.testing.assert_allclose(a, r, atol=gtol * max(1.0, float(np.abs(r).max())),
                                   err_msg=what)
    print(f"{name}: ok")


def run_registry() -> None:
    """``core.block_sparse_attention(impl="mosaic_gpu")`` equals ``impl="xla"`` (outputs and
    gradients, GQA, causal with a window), and so does ``BigBirdAttention(impl=...)``."""
    from attnhut_jax import core

    ks = jax.random.split(jax.random.key(7), 4)
    b, t, n, kg, h, bk = 1, 128, 4, 2, 32, 64
    q = jax.random.normal(ks[0], (b, t, n, h))
    k = jax.random.normal(ks[1], (b, t, kg, h))
    v = jax.random.normal(ks[2], (b, t, kg, h))
    keep = jax.random.bernoulli(ks[3], 0.7, (b, kg, t, t // bk))

    def grads(impl):
        def loss(q, k, v):
            out = core.block_sparse_attention(q, k, v, keep, block_k=bk, causal=True, window=80,
                                              impl=impl)
            return (out * jnp.sin(out)).sum(), out
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (got, out), (want, ref) = grads("mosaic_gpu"), grads("xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)
    for a, r in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=5e-5, rtol=5e-5)

    # a module that routes its attention through the op takes the impl by name
    from attnhut_jax import BigBirdAttention

    x = jax.random.normal(ks[0], (1, 256, 64))
    outs = {}
    for impl in ("mosaic_gpu", "xla"):
        mod = BigBirdAttention(64, 2, block_size=64, num_window_blocks=1, num_random_blocks=1,
                               num_global_blocks=1, causal=True, impl=impl)
        params = mod.init(jax.random.key(0), x)
        outs[impl] = jax.jit(mod.apply)(params, x)
    np.testing.assert_allclose(np.asarray(outs["mosaic_gpu"]), np.asarray(outs["xla"]),
                               atol=2e-5, rtol=2e-5)
    print("registry: ok")


if __name__ == "__main__":
    assert "JAX_COMPILATION_CACHE_DIR" not in os.environ
    assert int(os.environ.get("PJRT_NPROC", "0")) >= 4, "run with PJRT_NPROC=8 (see above)"
    assert jax.devices()[0].client is not None and not jax.config.read(
        "jax_cpu_enable_async_dispatch")
    for case in sys.argv[1:] or [*CASES, *TOKEN_CASES, "registry"]:
        if case == "registry":
            run_registry()
        elif case in TOKEN_CASES:
            run_token(case)
        else:
            run(case)
