"""The Mosaic GPU (Hopper) kernels: block-sparse (``pallas_kernels/block_sparse/mosaic_gpu.py``)
and token-sparse (``pallas_kernels/token_sparse/mosaic_gpu.py``) over ``mgpu_flash.py``'s passes.

- GPU interpret mode: outputs (and block-sparse's logsumexp) and gradients equal the references
  on the cases of ``mgpu_cases.py`` (causal and not, GQA, a sink logit, windows with sink keys,
  packed sequences, explicit positions, shared K/V, lengths and head widths that are not
  multiples of the tiles, float32 / bfloat16 / float16), and the registry's ``mosaic_gpu`` impl
  equals ``xla``. Each case runs in a process of its own (see ``mgpu_cases.py`` for why).
- The full-block flags only mark (tile, block) pairs in which every token reads every key, and
  do mark the interior of a causal selection.
- Refusals: dtype, block size and shared-memory overflow are named, through the registry too.
- ``jax.export`` lowering for an abstract H100: all three passes at the sizes the shared-memory
  plan gives, and one stage more than the plan overflows (so the plan is what keeps them in).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mgpu_cases import CASES, TOKEN_CASES
from test_kernel_lowering import export_for_cuda

import pallas_kernels.block_sparse.mosaic_gpu as mgpu
import pallas_kernels.token_sparse.mosaic_gpu as tok_mgpu
from attnhut_jax import core
from pallas_kernels import mgpu_flash
from pallas_kernels.block_sparse import token_keep
from pallas_kernels.block_sparse.kernel import block_config, checked_operands
from pallas_kernels.token_sparse import key_bitmask
from pallas_kernels.token_sparse import token_keep as token_sparse_keep
from pallas_kernels.token_sparse.kernel import token_config
from pallas_kernels.token_sparse.tables import segment_indices

HERE = Path(__file__).parent
CASE_TIMEOUT_S = 120  # a case takes 5-25 s on 2 busy cores
ATTEMPTS = 3

needs_interpret = pytest.mark.skipif(
    not hasattr(mgpu_flash.plgpu, "InterpretGPUParams"),
    reason=f"jax {jax.__version__} has no GPU interpret mode (plgpu.InterpretGPUParams)")


def _run_case(name: str) -> None:
    """Run ``mgpu_cases.py name`` in a fresh process with a thread pool the interpreter cannot
    exhaust (``PJRT_NPROC``, see ``mgpu_cases.py``). A wrong result fails at once. A run past
    the time limit is retried (up to ``ATTEMPTS``) as a last guard against that starvation; a
    kernel that deadlocks hangs every attempt and fails."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(JAX_PLATFORMS="cpu", PJRT_NPROC="8")
    hung = []
    for attempt in range(ATTEMPTS):
        try:
            proc = subprocess.run([sys.executable, str(HERE / "mgpu_cases.py"), name], env=env,
                                  capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            hung.append(attempt)
            continue
        assert proc.returncode == 0, f"{name}:\n{proc.stdout}\n{proc.stderr[-6000:]}"
        assert f"{name}: ok" in proc.stdout
        return
    pytest.fail(f"{name}: every one of {ATTEMPTS} attempts ran past {CASE_TIMEOUT_S} s")


@needs_interpret
@pytest.mark.parametrize("name", sorted(CASES) + sorted(TOKEN_CASES))
def test_interpret_mode_matches_reference(name):
    _run_case(name)


@needs_interpret
def test_registry_impl_equals_xla():
    _run_case("registry")


def test_interpret_mode_warns_when_the_cpu_pool_can_starve(monkeypatch):
    monkeypatch.setenv("PJRT_NPROC", "2")
    with pytest.warns(RuntimeWarning, match="set PJRT_NPROC=8"):
        mgpu_flash._warn_small_pool()
    monkeypatch.setenv("PJRT_NPROC", "8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mgpu_flash._warn_small_pool()


def _tile_selection(seed, b, t, s, kg, bk, p):
    """A random selection constant over each query tile (most of it per token), with a few
    tokens dropped: tiles where one token misses a block must not be flagged."""
    bq, qt = mgpu.BLOCK_Q, -(-t // mgpu.BLOCK_Q)
    k1, k2 = jax.random.split(jax.random.key(seed))
    keep = jax.random.bernoulli(k1, p, (b, kg, qt, 1, -(-s // bk)))
    keep = jnp.broadcast_to(keep, (b, kg, qt, bq, keep.shape[-1])).reshape(b, kg, qt * bq, -1)
    return keep[:, :, :t] & jax.random.bernoulli(k2, 0.995, (b, kg, t, keep.shape[-1]))


@pytest.mark.parametrize("rules", [dict(causal=True), dict(causal=False),
                                   dict(causal=True, window=200, num_sink_keys=3),
                                   dict(causal=True, segments=True)])
def test_full_flags_only_on_blocks_every_token_reads(rules):
    b, t, kg, h, bk = 2, 320, 2, 8, 64
    rules = dict(rules)
    segments = rules.pop("segments", False)
    keep = _tile_selection(3, b, t, t, kg, bk, 0.8)
    q = k = jnp.zeros((b, t, kg, h))
    seg = (jnp.zeros((b, t), jnp.int32).at[:, :192].set(1).at[:, 192:300].set(2)
           if segments else None)
    sel = checked_operands(q, k, keep, None, None, None, block_k=bk, q_seg_BT=seg, k_seg_BS=seg)
    cfg = block_config(q, k, block_q=mgpu.BLOCK_Q, block_k=bk, scale=None, interpret=True,
                       precision=None, segments=segments, key_sinks=False,
                       **{"window": None, "num_sink_keys": 0, **rules})
    qt, j = -(-t // mgpu.BLOCK_Q), -(-t // bk)
    full = np.asarray(mgpu.full_flags(sel, cfg, qt * mgpu.BLOCK_Q, j * bk))
    reads = np.asarray(token_keep(keep, t, bk, q_seg_BT=seg, k_seg_BS=seg, **rules))  # B K T S
    pad = np.zeros((b, kg, qt * mgpu.BLOCK_Q, j * bk), bool)
    pad[:, :, :t, :t] = reads
    every = pad.reshape(b, kg, qt, mgpu.BLOCK_Q, j, bk).all(axis=(3, 5))
    assert not np.any(full & ~every)
    assert full.sum() >= 0.5 * every.sum() > 0, (full.sum(), every.sum())


def test_full_flags_mark_the_interior_of_a_causal_selection():
    t, bk = 256, 64
    keep = jnp.ones((1, 1, t, t // bk), bool)
    q = jnp.zeros((1, t, 1, 8))
    sel = checked_operands(q, q, keep, None, None, None, block_k=bk)
    cfg = block_config(q, q, block_q=64, block_k=bk, causal=True, scale=None, interpret=True,
                       window=None, num_sink_keys=0, precision=None)
    full = np.asarray(mgpu.full_flags(sel, cfg, t, t))[0, 0]
    np.testing.assert_array_equal(full, np.tril(np.ones((4, 4), bool), -1))


@pytest.mark.parametrize("window,segments", [(None, False), (150, False), (40, True)])
def test_token_sparse_full_flags_only_on_blocks_every_query_reads(window, segments):
    b, t, s, bk = 2, 320, 384, 64
    bq, qt, j = mgpu_flash.BLOCK_Q, 5, 6
    ks = jax.random.split(jax.random.key(5), 2)
    # queries of a tile share most of their selection: whole blocks, minus a few keys
    blocks = jax.random.bernoulli(ks[0], 0.6, (b, qt, j))
    keyed = jnp.repeat(jnp.repeat(blocks, bq, axis=1), bk, axis=2)[:, :t]
    keyed = keyed & jax.random.bernoulli(ks[1], 0.9995, (b, t, s))
    order = jnp.where(keyed, jnp.arange(s), s)
    idx = jnp.sort(order, axis=-1)
    idx = jnp.where(idx < s, idx, -1).astype(jnp.int32)
    seg = (jnp.zeros((b, s), jnp.int32).at[:, :192].set(1).at[:, 192:360].set(2)
           if segments else None)
    q_seg = None if seg is None else seg[:, :t]
    cfg = token_config(jnp.zeros((b, t, 1, 8)), jnp.zeros((b, s, 1, 8)), None, block_q=bq,
                       words_per_block=bk // 32, scale=None, interpret=True, window=window,
                       window_start=s - t, precision=None)
    if segments:
        idx = segment_indices(idx, q_seg, seg)
    bits = key_bitmask(idx, s)
    bits = jnp.pad(bits, ((0, 0), (0, qt * bq - t), (0, 0)))
    segs = None if seg is None else (jnp.pad(q_seg, ((0, 0), (0, qt * bq - t))), seg)
    full = np.asarray(tok_mgpu.full_flags(bits, cfg, qt * bq, j * bk, segs))
    reads = np.zeros((b, qt * bq, j * bk), bool)
    reads[:, :t, :s] = np.asarray(token_sparse_keep(idx, s, window=window, window_start=s - t,
                                                    q_seg_BT=q_seg, k_seg_BS=seg))
    every = reads.reshape(b, qt, bq, j, bk).all(axis=(2, 4))
    assert not np.any(full & ~every)
    assert full.sum() >= 0.5 * every.sum() > 0, (full.sum(), every.sum())


def _operands(dtype, h=64, bk=64, t=128):
    q = jnp.zeros((1, t, 2, h), dtype)
    return q, q, q, jnp.ones((1, 2, t, t // bk), bool)


@pytest.mark.parametrize("dtype,h,bk,match", [
    (jnp.int32, 64, 64, "one dtype among float32, bfloat16, float16"),
    (jnp.bfloat16, 64, 32, "key blocks of a multiple of 64 keys"),
    (jnp.bfloat16, 512, 128, "do not fit 230400 bytes of shared memory"),
])
def test_refusals_name_the_reason(dtype, h, bk, match):
    q, k, v, keep = _operands(dtype, h, bk)
    with pytest.raises(ValueError, match=match):
        mgpu.block_sparse_attention_mgpu(q, k, v, keep, block_k=bk, causal=True)
    with pytest.raises(ValueError, match=r"mosaic_gpu.*" + match):
        core.block_sparse_attention(q, k, v, keep, block_k=bk, causal=True, impl="mosaic_gpu")


@pytest.mark.parametrize("dtype,wpb,match", [
    (jnp.int32, 2, "one dtype among float32, bfloat16, float16"),
    (jnp.bfloat16, 1, "key blocks of a multiple of 64 keys"),
])
def test_token_sparse_refusals_name_the_reason(dtype, wpb, match):
    q = jnp.zeros((1, 128, 2, 64), dtype)
    idx = jnp.zeros((1, 128, 8), jnp.int32)
    with pytest.raises(ValueError, match=match):
        tok_mgpu.token_sparse_attention_mgpu(q, q, q, idx, words_per_block=wpb)
    if wpb == 2:
        with pytest.raises(ValueError, match=r"mosaic_gpu.*" + match):
            core.token_sparse_attention(q, q, q, idx, impl="mosaic_gpu")


def test_shared_memory_plan_of_the_benchmark_shapes():
    plan = mgpu.smem_plan(jnp.bfloat16, 128, 128, 128)
    assert plan == {"fwd": 2, "dq": 2, "dkv": 2}
    assert min(mgpu.smem_plan(jnp.float32, 128, 128, 64).values()) >= 1


def test_gqa_heads_share_each_k_v_load_where_shared_memory_allows():
    sources = mgpu._sources(128)

    def plan(kind):
        return lambda heads: mgpu_flash.smem_plan(jnp.bfloat16, 128, 128, 128, sources, heads)[kind]

    # the benchmark shape: two heads per forward instance at full pipeline depth; dQ's two
    # heads would lose a stage, so it keeps one; odd groups and MHA keep one
    assert mgpu_flash.heads_per_instance(2, plan("fwd")) == 2
    assert mgpu_flash.heads_per_instance(8, plan("fwd")) == 2
    assert mgpu_flash.heads_per_instance(2, plan("dq")) == 1
    assert mgpu_flash.heads_per_instance(3, plan("fwd")) == 1
    assert mgpu_flash.heads_per_instance(1, plan("fwd")) == 1


def _export(dtype, t, n, kg, h, bk, **rules):
    sds = jax.ShapeDtypeStruct
    q, k = sds((1, t, n, h), dtype), sds((1, t, kg, h), dtype)
    keep, sink = sds((1, kg, t, t // bk), jnp.bool_), sds((n,), jnp.float32)

    def fwd_bwd(q, k, v, keep, sink):
        def loss(q, k, v, sink):
            out = mgpu.block_sparse_attention_mgpu(q, k, v, keep, block_k=bk, sink=sink,
                                                   interpret=False, **rules)
            return out.astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, sink)

    mlir = export_for_cuda(fwd_bwd, q, k, k, keep, sink)
    assert mlir.count("mosaic_gpu") >= 3  # forward, dq, dk/dv


@pytest.mark.parametrize("dtype,n,kg,h,bk,rules", [
    (jnp.bfloat16, 4, 2, 128, 128, dict(causal=True)),
    (jnp.bfloat16, 2, 2, 128, 128, dict(causal=True, window=100, num_sink_keys=4)),
    (jnp.float16, 2, 1, 64, 64, dict(causal=False)),
    (jnp.float32, 2, 1, 128, 64, dict(causal=True)),
])
def test_kernels_lower_for_an_abstract_h100(dtype, n, kg, h, bk, rules):
    _export(dtype, 256, n, kg, h, bk, **rules)


def _export_token(dtype, t, n, kg, h, wpb, shared=False, segments=False, **rules):
    sds = jax.ShapeDtypeStruct
    q, k = sds((1, t, n, h), dtype), sds((1, t, kg, h), dtype)
    idx, sink = sds((1, t, 32), jnp.int32), sds((n,), jnp.float32)
    seg = sds((1, t), jnp.int32)

    def fwd_bwd(q, k, v, idx, sink, seg):
        def loss(q, k, v, sink):
            out = tok_mgpu.token_sparse_attention_mgpu(
                q, k, None if shared else v, idx, sink=sink, words_per_block=wpb,
                interpret=False, **({"q_seg_BT": seg, "k_seg_BS": seg} if segments else {}),
                **rules)
            return out.astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, sink)

    mlir = export_for_cuda(fwd_bwd, q, k, k, idx, sink, seg)
    assert mlir.count("mosaic_gpu") >= 3


@pytest.mark.parametrize("dtype,n,kg,h,wpb,kw", [
    (jnp.bfloat16, 4, 2, 128, 2, dict(window=128, window_start=0)),
    (jnp.bfloat16, 2, 1, 128, 4, dict(segments=True)),
    (jnp.float32, 2, 1, 64, 2, dict(shared=True)),
])
def test_token_sparse_kernels_lower_for_an_abstract_h100(dtype, n, kg, h, wpb, kw):
    _export_token(dtype, 256, n, kg, h, wpb, **kw)


def test_one_stage_more_than_the_plan_overflows_shared_memory(monkeypatch):
    planned = mgpu_flash.smem_plan

    def one_more(*args):
        return {k: v + 1 for k, v in planned(*args).items()}

    monkeypatch.setattr(mgpu_flash, "smem_plan", one_more)
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        _export(jnp.float32, 256, 2, 1, 128, 64, causal=True)
