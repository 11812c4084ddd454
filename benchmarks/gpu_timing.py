"""Timing helpers shared by the GPU benchmarks: median wall time of a jitted call, and the
forward / forward + backward comparison of a sparse kernel against cuDNN's dense attention."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

# backward work relative to the forward's: dq, dk, dv recompute the logits (2.5x forward)
PASSES = {"fwd": 1.0, "fwd+bwd": 3.5}


def median_ms(fn, reps: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls after one warm-up (compilation)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def dense_causal(dense_impl: str):
    """``jax.nn.dot_product_attention`` causal with the given implementation ("cudnn", "xla")."""
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                        implementation=dense_impl)


def sparse_vs_dense(sparse, dense, qkv, passes, reps: int):
    """Yield ``(pass, work multiplier, sparse ms, dense ms)`` for each requested pass."""
    for name, mult in PASSES.items():
        if name not in passes:
            continue
        row = []
        for fn in (sparse, dense):
            if name == "fwd":
                f = jax.jit(fn)
            else:
                f = jax.jit(jax.grad(lambda q, k, v, fn=fn: fn(q, k, v).astype(jnp.float32).sum(),
                                     argnums=(0, 1, 2)))
            row.append(median_ms(lambda f=f: f(*qkv), reps))
        yield name, mult, row[0], row[1]
