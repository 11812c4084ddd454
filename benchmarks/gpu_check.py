"""Correctness of the compiled Pallas GPU kernels on a real GPU (not interpret mode).

Each check runs the kernel compiled for the device and a float32 reference computed by XLA at
``highest`` matmul precision on the same device, for outputs and for the gradients of a random
projection of the output, and prints the relative error ``|a - ref| / |ref|`` (Frobenius) and
the largest absolute error. float32 inputs must land under 1e-4 (the kernels' float32 dots are
IEEE), bfloat16 inputs under 2e-2. Every check runs whatever happens to the others, so one run
shows every failure; the exit status is the number of failed checks.

Sections: the block-sparse kernel (``block``: Triton; ``mgpu``: the Mosaic GPU block-sparse and
token-sparse kernels, Hopper only, whose float32 products are TF32 whatever the precision, so
their float32 bound is 2e-3),
the token-sparse kernel, the fused indexer top-k (the selected sets equal ``lax.top_k``'s, ties
broken by key index), and each sparse module with ``impl="pallas"`` against
``impl="reference"``.

    python benchmarks/gpu_check.py            # on a GPU machine
    python benchmarks/gpu_check.py --quick    # fewer configurations
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse import BlockSizes as BlockSparseSizes
from pallas_kernels.block_sparse import (
    block_sparse_attention,
    block_sparse_attention_mgpu,
    block_sparse_attention_reference,
)
from pallas_kernels.token_sparse import BlockSizes as TokenSparseSizes
from pallas_kernels.token_sparse import (
    indexer_scores_reference,
    indexer_topk_pallas,
    indexer_topk_reference,
    token_sparse_attention,
    token_sparse_attention_mgpu,
    token_sparse_attention_reference,
)

TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}
TF32_TOL = 2e-3
RESULTS: list[tuple[str, bool, str]] = []


def _rel(a, r) -> tuple[float, float]:
    a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf"), float("inf")
    den = max(np.linalg.norm(r), 1e-30)
    return float(np.linalg.norm(a - r) / den), float(np.abs(a - r).max(initial=0.0))


def check(name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        worst = fn()
        ok = all(err <= tol for _, err, _, tol in worst)
        detail = " ".join(f"{n}={e:.1e}(max {m:.1e})" for n, e, m, _ in worst)
    except Exception as exc:  # noqa: BLE001 - report every failure, keep going
        ok, detail = False, f"{type(exc).__name__}: {str(exc)[:1500]}"
        traceback.print_exc(limit=3)
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name} [{time.perf_counter() - t0:.1f}s] {detail}",
          flush=True)


def _grads(fn, args, g, argnums):
    def loss(*a):
        out = fn(*a)
        return (out.astype(jnp.float32) * g).sum(), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(*args)
    return out, grads


def _compare(kern, ref, args, g, argnums, dtype, names, tol=None):
    # float32 dots follow JAX's default matmul precision, TF32 on NVIDIA GPUs; "highest" makes
    # them IEEE float32 in the kernels (Triton) and in the XLA reference alike
    with jax.default_matmul_precision("highest"):
        out, grads = _grads(kern, args, g, argnums)
    f32 = tuple(a.astype(jnp.float32) if a is not None and jnp.issubdtype(a.dtype, jnp.floating)
                else a for a in args)
    with jax.default_matmul_precision("highest"):
        r_out, r_grads = _grads(ref, f32, g, argnums)
    tol = TOL[dtype] if tol is None else tol
    rows = [("out", *_rel(out, r_out), tol)]
    for n, a, r in zip(names[: len(argnums)], grads, r_grads, strict=True):
        rows.append((n, *_rel(a, r), 2 * tol))
    return rows


def block_sparse_case(b, t, s, n, kg, h, vw, bk, bq, causal, p, dtype, sink=False, valid=False,
                      seed=0, mgpu=False, **rules):
    ks = jax.random.split(jax.random.key(seed), 7)
    q = jax.random.normal(ks[0], (b, t, n, h), dtype)
    k = jax.random.normal(ks[1], (b, s, kg, h), dtype)
    v = jax.random.normal(ks[2], (b, s, kg, vw), dtype)
    keep = jax.random.bernoulli(ks[3], p, (b, kg, t, -(-s // bk)))
    sk = jax.random.normal(ks[4], (n,)) if sink else None
    kv = jax.random.bernoulli(ks[5], 0.9, (b, s)) if valid else None
    g = jax.random.normal(ks[6], (b, t, n, vw))

    def make(fn, **extra):
        def f(q, k, v, sk):
            return fn(q, k, v, keep, block_k=bk, causal=causal, sink=sk, key_valid_BS=kv,
                      **rules, **extra)
        return f

    argnums = (0, 1, 2, 3) if sink else (0, 1, 2)
    kern = (make(block_sparse_attention_mgpu) if mgpu
            else make(block_sparse_attention, block_sizes=BlockSparseSizes(bq)))
    tol = TF32_TOL if mgpu and dtype == jnp.float32 else None
    return _compare(kern, make(block_sparse_attention_reference), (q, k, v, sk), g, argnums,
                    dtype, ("dq", "dk", "dv", "dsink"), tol)


def _selection(key, b, t, s, m, causal=True):
    scores = jax.random.uniform(key, (b, t, s))
    if causal:
        scores = jnp.where(jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t), scores, -1)
    vals, idx = jax.lax.top_k(scores, min(m, s))
    return jnp.where(vals < 0, -1, idx).astype(jnp.int32)


def token_sparse_case(b, t, s, n, kg, h, m, dtype, shared=False, window=None, bq=64, wpb=2,
                      seed=0, mgpu=False):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (b, t, n, h), dtype)
    k = jax.random.normal(ks[1], (b, s, kg, h), dtype)
    vw = h
    v = None if shared else jax.random.normal(ks[2], (b, s, kg, vw), dtype)
    idx = _selection(ks[3], b, t, s, m)
    sk = jax.random.normal(ks[4], (n,))
    g = jax.random.normal(ks[5], (b, t, n, vw))
    kw = dict(window=window, window_start=s - t if window else 0)

    def make(fn, **extra):
        if shared:
            return lambda q, k, sk: fn(q, k, None, idx, sink=sk, **kw, **extra)
        return lambda q, k, v, sk: fn(q, k, v, idx, sink=sk, **kw, **extra)

    args = (q, k, sk) if shared else (q, k, v, sk)
    names = ("dq", "dkv", "dsink") if shared else ("dq", "dk", "dv", "dsink")
    kern = (make(token_sparse_attention_mgpu, words_per_block=wpb) if mgpu
            else make(token_sparse_attention, block_sizes=TokenSparseSizes(bq, wpb)))
    return _compare(kern, make(token_sparse_attention_reference), args, g,
                    tuple(range(len(args))), dtype, names,
                    TF32_TOL if mgpu and dtype == jnp.float32 else None)


def indexer_case(b, t, s, ni, e, top_k, causal, seed=0, integer=False):
    ks = jax.random.split(jax.random.key(seed), 3)
    if integer:  # many exact ties
        q = jax.random.randint(ks[0], (b, t, ni, e), -2, 3).astype(jnp.float32)
        k = jax.random.randint(ks[1], (b, s, e), -2, 3).astype(jnp.float32)
        w = jax.random.randint(ks[2], (b, t, ni), 0, 3).astype(jnp.float32)
    else:
        q = jax.random.normal(ks[0], (b, t, ni, e))
        k = jax.random.normal(ks[1], (b, s, e))
        w = jax.random.normal(ks[2], (b, t, ni))
    with jax.default_matmul_precision("highest"):
        idx, _ = jax.jit(lambda q, k, w: indexer_topk_pallas(q, k, w, top_k, causal=causal))(
            q, k, w)
        ridx, rval = indexer_topk_reference(q, k, w, top_k, causal=causal)
        scores = np.asarray(indexer_scores_reference(q, k, w), np.float64)
    a, r = np.sort(np.asarray(idx), -1), np.sort(np.asarray(ridx), -1)
    differ = (a != r).any(-1)
    # a differing row is a near tie if every key the kernel picked scores (in the reference)
    # within float32 rounding of the reference's k-th score: summation order may flip those
    kth = np.asarray(rval, np.float64).min(-1, where=np.asarray(ridx) >= 0, initial=np.inf)
    picked = np.where(a >= 0, np.take_along_axis(scores, np.maximum(a, 0), -1), np.inf)
    eps = 1e-5 * np.abs(scores).max(-1) + 1e-6
    near = (picked.min(-1) >= kth - eps) & ((a >= 0).sum(-1) == (r >= 0).sum(-1))
    bad = float((differ & ~near).mean())
    return [("rows_wrong", bad, bad, 0.0),
            ("rows_near_tie", float((differ & near).mean()), 0.0, 1.0)]


MODULES = ("MiniMaxSparseAttention", "BigBirdAttention", "DeepSeekSparseAttention",
           "CompressedSparseAttention", "HeavilyCompressedAttention", "DeltaAttention")


def module_case(name, dtype=jnp.float32, seed=0):
    import attnhut_jax as ah
    d, n = 256, 4
    ctor = {
        "MiniMaxSparseAttention": lambda impl: ah.MiniMaxSparseAttention(d, n, 2, impl=impl),
        "BigBirdAttention": lambda impl: ah.BigBirdAttention(d, n, impl=impl),
        "DeepSeekSparseAttention": lambda impl: ah.DeepSeekSparseAttention(d, n, top_k=96,
                                                                         impl=impl),
        "CompressedSparseAttention": lambda impl: ah.CompressedSparseAttention(d, n, impl=impl),
        "HeavilyCompressedAttention": lambda impl: ah.HeavilyCompressedAttention(d, n,
                                                                                impl=impl),
        "DeltaAttention": lambda impl: ah.DeltaAttention(d, n, impl=impl),
    }[name]
    t = 384
    x = jax.random.normal(jax.random.key(seed), (2, t, d), dtype)
    ref_mod, ker_mod = ctor("reference"), ctor("pallas")
    variables = ref_mod.init(jax.random.key(1), x)
    g = jax.random.normal(jax.random.key(2), (2, t, d))

    def run(mod, prec):
        def loss(v, x):
            out = mod.apply(v, x)
            return (out.astype(jnp.float32) * g).sum(), out
        with jax.default_matmul_precision(prec):
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(variables, x)

    (_, out), (gv, gx) = run(ker_mod, "highest")
    (_, r_out), (r_gv, r_gx) = run(ref_mod, "highest")
    tol = TOL[dtype]
    flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])  # noqa: E731
    return [("out", *_rel(out, r_out), tol), ("dparams", *_rel(flat(gv), flat(r_gv)), 2 * tol),
            ("dx", *_rel(gx, r_gx), 2 * tol)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sections", nargs="+",
                    default=["block", "mgpu", "token", "indexer", "modules"])
    ap.add_argument("--modules", nargs="+", default=list(MODULES))
    args = ap.parse_args()
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, {dev.platform}: {getattr(dev, 'device_kind', '?')}",
          flush=True)
    f32, bf16 = jnp.float32, jnp.bfloat16
    if "block" in args.sections:
        check("block f32 causal mha h64 bk64", lambda: block_sparse_case(
            1, 512, 512, 4, 4, 64, 64, 64, 64, True, 0.3, f32))
        check("block bf16 causal gqa h128 bk128 sink valid", lambda: block_sparse_case(
            2, 1024, 1024, 8, 2, 128, 128, 128, 64, True, 0.2, bf16, sink=True, valid=True))
        check("block f32 bidirectional t!=tile h96 vw80", lambda: block_sparse_case(
            1, 300, 333, 4, 2, 96, 80, 64, 64, False, 0.4, f32, sink=True))
        if not args.quick:
            check("block f32 window+sink keys h32 bq128", lambda: block_sparse_case(
                1, 700, 700, 2, 1, 32, 32, 64, 128, True, 1.0, f32, window=100,
                num_sink_keys=64))
            check("block bf16 causal T<S h128", lambda: block_sparse_case(
                1, 200, 520, 4, 4, 128, 128, 64, 64, True, 0.5, bf16))
    if "mgpu" in args.sections:  # bq is the kernel's own (64)
        check("mgpu bf16 causal gqa h128 bk128 sink valid", lambda: block_sparse_case(
            2, 1024, 1024, 8, 2, 128, 128, 128, 64, True, 0.2, bf16, sink=True, valid=True,
            mgpu=True))
        check("mgpu bf16 causal full selection h128 bk128", lambda: block_sparse_case(
            1, 2048, 2048, 4, 4, 128, 128, 128, 64, True, 1.0, bf16, mgpu=True))
        check("mgpu f32 bidirectional t!=tile h96 vw80", lambda: block_sparse_case(
            1, 300, 333, 4, 2, 96, 80, 64, 64, False, 0.4, f32, sink=True, mgpu=True))
        check("mgpu token bf16 gqa h128 m256", lambda: token_sparse_case(
            2, 1024, 1024, 8, 2, 128, 256, bf16, mgpu=True))
        check("mgpu token f32 shared kv window (CSA) h96", lambda: token_sparse_case(
            1, 300, 380, 4, 1, 96, 16, f32, shared=True, window=64, mgpu=True))
        if not args.quick:
            check("mgpu token bf16 shared kv h128 m32 wpb4", lambda: token_sparse_case(
                1, 777, 900, 4, 1, 128, 32, bf16, shared=True, window=128, wpb=4, mgpu=True))
            check("mgpu f32 window+sink keys h32", lambda: block_sparse_case(
                1, 700, 700, 2, 1, 32, 32, 64, 64, True, 1.0, f32, window=100,
                num_sink_keys=64, mgpu=True))
            check("mgpu bf16 causal T<S h64 bk64", lambda: block_sparse_case(
                1, 200, 520, 4, 4, 64, 64, 64, 64, True, 0.5, bf16, mgpu=True))
    if "token" in args.sections:
        check("token f32 causal mha h64 m64", lambda: token_sparse_case(
            1, 512, 512, 4, 4, 64, 64, f32))
        check("token bf16 gqa h128 m256", lambda: token_sparse_case(
            2, 1024, 1024, 8, 2, 128, 256, bf16))
        check("token f32 shared kv window (CSA) h96", lambda: token_sparse_case(
            1, 300, 380, 4, 1, 96, 16, f32, shared=True, window=64))
        if not args.quick:
            check("token f32 top_k>=T bq32 wpb4", lambda: token_sparse_case(
                1, 200, 200, 2, 2, 64, 256, f32, bq=32, wpb=4))
            check("token bf16 shared kv h128 m32", lambda: token_sparse_case(
                1, 777, 900, 4, 1, 128, 32, bf16, shared=True, window=128))
    if "indexer" in args.sections:
        check("indexer causal top_k 64", lambda: indexer_case(1, 512, 512, 4, 64, 64, True))
        check("indexer bidirectional top_k 200 T!=tile", lambda: indexer_case(
            2, 300, 333, 4, 64, 200, False))
        check("indexer integer ties top_k 32", lambda: indexer_case(
            1, 256, 256, 2, 16, 32, True, integer=True))
        if not args.quick:
            check("indexer top_k>=S", lambda: indexer_case(1, 100, 100, 4, 64, 128, True))
    if "modules" in args.sections:
        for name in args.modules:
            check(f"module {name} pallas vs reference", lambda name=name: module_case(name))
    failed = [r for r in RESULTS if not r[1]]
    print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed")
    for name, _, detail in failed:
        print(f"  FAILED {name}: {detail[:300]}")
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())
