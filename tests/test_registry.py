"""The implementation registry: the table, validation, ``auto`` resolution, the dense ``cudnn`` seam
and ``precision`` reaching every matmul."""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnhut_jax as ah
from attnhut_jax import core, registry

D = 32
DENSE = {
    "StandardAttention": lambda **kw: ah.StandardAttention(D, 4, causal=True, **kw),
    "MultiQueryAttention": lambda **kw: ah.MultiQueryAttention(D, 4, **kw),
    "GroupedQueryAttention": lambda **kw: ah.GroupedQueryAttention(D, 4, 2, causal=True, **kw),
    "MultiHeadLatentAttention": lambda **kw: ah.MultiHeadLatentAttention(D, 4, **kw),
    "DifferentialAttention": lambda **kw: ah.DifferentialAttention(D, 2, **kw),
}
SPARSE = {  # module -> (factory, the registry op its impl names)
    "BigBirdAttention": (lambda **kw: ah.BigBirdAttention(D, 4, block_size=4, **kw),
                         "block_sparse"),
    "DeltaAttention": (lambda **kw: ah.DeltaAttention(D, 4, window=4, stride=3, **kw),
                       "block_sparse"),
    "MiniMaxSparseAttention": (lambda **kw: ah.MiniMaxSparseAttention(D, 4, 2, block_size=4,
                                                                      top_k=2, **kw),
                               "block_sparse"),
    "HeavilyCompressedAttention": (lambda **kw: ah.HeavilyCompressedAttention(
        D, 4, compression_rate=4, window=4, **kw), "block_sparse"),
    "DeepSeekSparseAttention": (lambda **kw: ah.DeepSeekSparseAttention(
        D, 4, top_k=4, index_head_dim=8, **kw), "dsa"),
    "CompressedSparseAttention": (lambda **kw: ah.CompressedSparseAttention(
        D, 4, compression_rate=2, top_k=3, window=4, index_dim=8, **kw), "csa"),
    "SinkhornAttention": (lambda **kw: ah.SinkhornAttention(D, 4, 4, max_len=12, **kw),
                          "sinkhorn"),
}
X = jax.random.normal(jax.random.key(1), (2, 12, D), jnp.float32)


def test_every_operation_has_every_concrete_impl_registered():
    for op, allowed in registry.OPERATIONS.items():
        assert set(registry.implementations(op)) == set(allowed) - {"auto"}, op


def test_register_refuses_unknown_ops_auto_and_duplicates():
    with pytest.raises(ValueError, match=r"unknown operation 'fft'"):
        registry.register("fft", "xla")
    with pytest.raises(ValueError, match=r"impl='auto' is not a concrete impl of 'dense'"):
        registry.register("dense", "auto")
    with pytest.raises(ValueError, match=r"impl='pallas' is not a concrete impl of 'dense'"):
        registry.register("dense", "pallas")
    with pytest.raises(ValueError, match=r"\('dense', 'xla'\) is already registered"):
        registry.register("dense", "xla")(lambda *a, **k: None)


def test_backend_entries_pick_the_tpu_kernels_on_tpu(monkeypatch):
    from pallas_kernels import block_sparse, token_sparse

    on = {"cpu": {}, "tpu": {}}
    for backend in on:
        monkeypatch.setattr(registry.jax, "default_backend", lambda b=backend: b)
        for op in ("block_sparse", "token_sparse", "indexer_topk"):
            on[backend][op] = registry.select("test", op, "pallas")
    assert on["cpu"] == {"block_sparse": block_sparse.block_sparse_attention,
                         "token_sparse": token_sparse.token_sparse_attention,
                         "indexer_topk": token_sparse.indexer_topk_pallas}
    assert on["tpu"] == {"block_sparse": block_sparse.block_sparse_attention_tpu,
                         "token_sparse": token_sparse.token_sparse_attention_tpu,
                         "indexer_topk": token_sparse.indexer_topk}
    with pytest.raises(ValueError, match=r"\('block_sparse', 'pallas'\) on 'tpu' is already"):
        registry.register("block_sparse", "pallas", backend="tpu")(lambda *a, **k: None)


def test_resolve_auto_per_backend():
    for op in set(registry.OPERATIONS) - {"gated_delta"}:
        assert registry.resolve(op, "auto", "cpu") == "xla"
        assert registry.resolve(op, "xla", "gpu") == "xla"
    assert registry.resolve("gated_delta", "auto", "cpu") == "chunk"
    assert registry.resolve("gated_delta", "auto", "gpu") == "pallas"
    assert registry.resolve("gated_delta", "auto", "tpu") == "pallas"
    assert registry.resolve("dense", "auto", "gpu") == "cudnn"
    assert registry.resolve("dense", "auto", "tpu") == "xla"
    for op in ("block_sparse", "token_sparse", "indexer_topk", "dsa", "csa", "msa_index_loss"):
        assert registry.resolve(op, "auto", "gpu") == "pallas"
        assert registry.resolve(op, "auto", "tpu") == "pallas"
    assert registry.resolve("dense", "auto") == ("cudnn" if jax.default_backend() == "gpu"
                                                 else "xla")


@pytest.mark.parametrize("name", list(DENSE) + list(SPARSE))
def test_bad_impl_names_module_op_and_allowed_values(name):
    factory, op = (DENSE[name], "dense") if name in DENSE else SPARSE[name]
    wrong = "pallas" if op == "dense" else "cudnn"
    for bad in ("fast", wrong):
        msg = (rf"{name}: impl='{bad}' is not an implementation of '{op}'; allowed: "
               + re.escape(str(registry.OPERATIONS[op])))
        with pytest.raises(ValueError, match=msg):
            factory(impl=bad).init(jax.random.key(0), X)


def test_bad_impl_of_cjepa():
    mod = ah.CausalJEPAAttention(D, 4, num_slots=3, history_frames=2, depth=1, impl="reference")
    with pytest.raises(ValueError, match=r"CausalJEPAAttention: impl='reference' is not an "
                                         r"implementation of 'dense'"):
        mod.init(jax.random.key(0), jnp.zeros((1, 2, 3, D)), jnp.array([0]))


def test_no_module_body_branches_on_an_impl_name():
    root = pathlib.Path(ah.__file__).parent
    for path in root.glob("*.py"):
        if path.name == "registry.py":
            continue
        text = path.read_text()
        assert not re.search(r"impl\s*[!=]=|impl\s+(not\s+)?in\s", text), path.name


@pytest.mark.parametrize("name", DENSE)
def test_auto_equals_xla_on_cpu(name):
    assert jax.default_backend() == "cpu"
    mod = DENSE[name]()
    v = jax.jit(mod.init)(jax.random.key(0), X)
    np.testing.assert_array_equal(np.asarray(mod.apply(v, X)),
                                  np.asarray(DENSE[name](impl="xla").apply(v, X)))


@pytest.mark.parametrize("name", DENSE)
def test_cudnn_without_a_gpu_says_why(name):
    mod = DENSE[name](impl="cudnn", dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=rf"{name}: impl='cudnn' cannot run 'dense' here: cuDNN "
                                         r"attention needs an NVIDIA GPU, and JAX's default "
                                         r"backend is 'cpu'"):
        mod.init(jax.random.key(0), X)


def test_cjepa_cudnn_without_a_gpu_says_why():
    mod = ah.CausalJEPAAttention(D, 4, num_slots=3, history_frames=2, depth=1, impl="cudnn")
    with pytest.raises(ValueError, match=r"StandardAttention: impl='cudnn' cannot run 'dense' "
                                         r"here: cuDNN attention needs an NVIDIA GPU"):
        mod.init(jax.random.key(0), jnp.zeros((1, 2, 3, D)), jnp.array([0]))


def _qkv(t=8, s=8, n=4, k=2, h=16, v=16, dtype=jnp.bfloat16):
    return (jnp.zeros((2, t, n, h), dtype), jnp.zeros((2, s, k, h), dtype),
            jnp.zeros((2, s, k, v), dtype))


@pytest.mark.parametrize("case,kwargs,why", [
    ("float32", dict(dtype=jnp.float32), r"float16 or bfloat16 operands of one dtype, got "
                                         r"q/k/v float32/float32/float32"),
    ("V != H (MLA, Differential)", dict(v=32), r"value head width V=32 differs from query/key "
                                               r"head width H=16"),
    ("H not a multiple of 8", dict(h=12, v=12), r"head width H=12 must be a multiple of 8"),
    ("H too wide", dict(h=512, v=512), r"head width H=512 must be a multiple of 8 and <= "),
])
def test_cudnn_reasons_on_a_gpu_backend(case, kwargs, why):
    assert re.search(why, core.cudnn_unsupported(*_qkv(**kwargs), backend="gpu")), case


def test_cudnn_reasons_for_dropout_causal_and_masks():
    q, k, v = _qkv()
    assert core.cudnn_unsupported(q, k, v, backend="gpu") is None
    assert core.cudnn_unsupported(q, k, v, causal=True, backend="gpu") is None
    assert "dropout" in core.cudnn_unsupported(q, k, v, dropout_rate=0.1, backend="gpu")
    q7, k9, v9 = _qkv(t=7, s=9)
    assert "T=7 != S=9" in core.cudnn_unsupported(q7, k9, v9, causal=True, backend="gpu")
    assert "even lengths" in core.cudnn_unsupported(q7, k9, v9, keep=jnp.ones((7, 9), bool),
                                                    backend="gpu")
    assert core.cudnn_unsupported(q7, k9, v9, backend="gpu") is None


def test_auto_takes_the_first_supported_impl_and_explicit_never_falls_back(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert registry.select("T", "dense", "auto", *_qkv()) is core.dense_attention_cudnn
    assert registry.select("T", "dense", "auto", *_qkv(dtype=jnp.float32)) is \
        core.dense_attention_xla
    assert registry.select("T", "dense", "auto", *_qkv(v=32)) is core.dense_attention_xla
    with pytest.raises(ValueError, match=r"T: impl='cudnn' cannot run 'dense' here: value head "
                                         r"width V=32"):
        registry.select("T", "dense", "cudnn", *_qkv(v=32))


def _dots(jaxpr):
    """Every dot_general equation in ``jaxpr`` and the jaxprs nested in its parameters."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _dots(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _dots(sub)


ALL = {**{n: (f, "dense") for n, f in DENSE.items()}, **SPARSE,
       "SlotAttention": (lambda **kw: ah.SlotAttention(D, 3, hidden_dim=16, **kw), None),
       "CausalJEPAAttention": (lambda **kw: ah.CausalJEPAAttention(
           D, 4, num_slots=3, history_frames=2, depth=1, **kw), "dense"),
       "LightningIndexer": (lambda **kw: ah.LightningIndexer(D, 2, 8, **kw), None),
       "GroupedOutputProjection": (lambda **kw: ah.GroupedOutputProjection(4, 8, 2, D, **kw),
                                   None)}


def _inputs(name):
    if name == "CausalJEPAAttention":
        return jnp.ones((1, 2, 3, D)), jnp.array([0])
    if name == "SlotAttention":
        return X, jnp.zeros((2, 3, D))
    if name == "GroupedOutputProjection":
        return (jnp.ones((2, 12, 4, 8)),)
    return (X,)


PRECISION_CASES = [(name, impl) for name, (_, op) in ALL.items()
                   for impl in ((None,) if op is None else ("xla",) if op == "dense"
                                else ("reference", "xla"))]


@pytest.mark.parametrize("name,impl", PRECISION_CASES)
def test_precision_reaches_every_matmul(name, impl):
    factory, _ = ALL[name]
    kw = {} if impl is None else dict(impl=impl)
    mod = factory(precision="highest", **kw)
    args = _inputs(name)
    v = jax.jit(mod.init)(jax.random.key(0), *args)
    jaxpr = jax.make_jaxpr(lambda v, *a: mod.apply(v, *a))(v, *args)
    dots = list(_dots(jaxpr.jaxpr))
    assert dots
    highest = jax.lax.Precision.HIGHEST
    loose = [str(e.source_info.traceback).splitlines()[-1] if e.source_info.traceback else e
             for e in dots if e.params["precision"] != (highest, highest)]
    assert not loose, loose


@pytest.mark.parametrize("case", ["none", "causal", "bool_with_empty_rows", "bias_with_neginf",
                                  "per_head_mask", "gqa_causal"])
def test_the_cudnn_adapter_keeps_attnhuts_rules(case):
    """The cudnn path's mask/bias/empty-row handling, run through ``jax.nn``'s XLA implementation
    on CPU (cuDNN itself needs a GPU): it computes what the ``xla`` impl computes."""
    t, n, k = 6, 4, (2 if case == "gqa_causal" else 4)
    key = iter(jax.random.split(jax.random.key(7), 8))
    q = jax.random.normal(next(key), (2, t, n, 8))
    kk = jax.random.normal(next(key), (2, t, k, 8))
    v = jax.random.normal(next(key), (2, t, k, 8))
    keep, bias, causal = None, None, case in ("causal", "gqa_causal")
    if case == "bool_with_empty_rows":
        keep = jax.random.bernoulli(next(key), 0.5, (2, 1, t, t)).at[:, :, 2].set(False)
    if case == "bias_with_neginf":
        bias = jax.random.normal(next(key), (t, t)).at[3].set(-jnp.inf).at[1, :3].set(-jnp.inf)
        keep = ~jnp.isneginf(bias)
    if case == "per_head_mask":
        keep = jax.random.bernoulli(next(key), 0.6, (1, n, t, t))
    want = core.dense_attention_xla(q, kk, v, keep=keep, bias=bias, causal=causal, scale=0.3)
    got = core.jax_nn_attention(q, kk, v, keep=keep, bias=bias, causal=causal, scale=0.3,
                                implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    if case == "bool_with_empty_rows":
        assert np.all(np.asarray(got)[:, 2] == 0)
