"""Incremental decoding of DeltaAttention: decode == prefill across window, sink and stride
boundaries, ragged prompts, one compilation, the cache's bytes, and a step without an anchor
reading only its window and sink keys. Also runs the usage snippet of docs/decoding.md."""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnhut_jax as ah
from tests import decode_harness as h
from tests.jaxpr_walk import jaxpr_eqns

D = 16


def delta(window=4, sink=2, stride=3):
    return lambda dec: ah.DeltaAttention(D, 2, window=window, sink=sink, stride=stride, bias=True,
                                         decode=dec)


def _x(t, b=2, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, t, D))


def test_decode_equals_prefill():
    """window 4 + sink 2 + stride 3 over 14 tokens crosses every boundary: the window leaves the
    sinks behind at position 6, anchors at 0, 3, ..., 12, chunks of 3, 4, 2 hold 1 or 2 anchors
    or start past one; the cache is longer than the sequence."""
    h.check_decode_equals_prefill(delta(), _x(14), max_len=17)


@pytest.mark.parametrize("window,sink,stride,t", [(1, 0, 1, 5), (2, 3, 9, 8)])
def test_decode_equals_prefill_edge_cases(window, sink, stride, t):
    """stride 1 (an anchor at every row: full causal attention) over a one-key window and no
    sinks; more sinks than window and a stride longer than the sequence (only anchor 0). Token
    by token, then one chunk."""
    h.check_decode_equals_prefill(delta(window, sink, stride), _x(t), chunks=[t])


def test_ragged_prompts():
    h.check_ragged_prompts(delta(), _x(12), [3, 7], steps=5)


def test_compiles_once_and_bytes():
    h.check_compiles_once(delta(), _x(4))
    variables = h.check_cache_bytes(delta(), 2, 9, D)
    assert variables["cache"]["correction"].shape == (2, 2, D // 2)
    m = delta()(True)
    # K + V + the (B, N, H) correction in the cache dtype, and the int32 index
    assert m.cache_bytes(3, 100, jnp.bfloat16) == 2 * 3 * 100 * D * 2 + 3 * D * 2 + 3 * 4


def test_decode_reads_accounting():
    m = ah.DeltaAttention(64, 4, window=256, sink=4, stride=16, decode=True)
    assert m.decode_reads(100) == 100 + 100 / 16
    assert m.decode_reads(4096) == 260 + 4096 / 16
    assert isinstance(m.decode_reads(4096), float)
    assert m.decode_scored(4096) == 0


def _cache_after(make, params, x, max_len):
    cache = h.empty_cache(make, x.shape[0], max_len, D)["cache"]
    _, cache = h.stepper(make)(params, cache, x)
    return cache


def test_non_anchor_step_reads_only_window_and_sink():
    """window 4, sink 2, stride 3: after 10 tokens the step at position 10 (anchor 9, corrected
    by the cached correction) reads keys 7..10 and the sinks 0, 1. NaN in the cached keys and
    values 2..6 leaves it unchanged; the anchor step at position 9 reads them (its dense pass)."""
    make = delta()
    x = _x(11)
    params = h.params_of(make, x)
    step = h.stepper(make)

    def poison(cache, value):
        for name in ("key", "value"):
            cache = {**cache, name: cache[name].at[:, 2:7].set(value)}
        return cache

    cache = _cache_after(make, params, x[:, :10], 16)
    want, _ = step(params, cache, x[:, 10:11])
    got, _ = step(params, poison(cache, jnp.nan), x[:, 10:11])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # the check can fail: the anchor step at position 9 reads every earlier key
    cache9 = _cache_after(make, params, x[:, :9], 16)
    want9, _ = step(params, cache9, x[:, 9:10])
    got9, _ = step(params, poison(cache9, 3.0), x[:, 9:10])
    assert float(jnp.abs(got9 - want9).max()) > 1e-3
    assert bool(jnp.all(jnp.isnan(step(params, poison(cache9, jnp.nan), x[:, 9:10])[0])))


def test_the_dense_pass_runs_only_under_the_anchor_condition():
    """In the traced step, every product over the whole cache (axis of length max_len) sits in a
    ``cond`` branch (the anchors' dense pass); outside it the step gathers window + sink keys."""
    make, max_len = delta(), 37
    x = _x(1)
    params = h.params_of(make, x)
    cache = h.empty_cache(make, 2, max_len, D)["cache"]
    m = make(True)
    jaxpr = jax.make_jaxpr(lambda c, a: m.apply({"params": params, "cache": c}, a,
                                                mutable=["cache"]))(cache, x)

    def whole_cache_dots(eqns, inside_cond):
        found = []
        for eqn in eqns:
            if eqn.primitive.name == "dot_general" and any(
                    max_len in getattr(v.aval, "shape", ()) for v in eqn.invars):
                found.append(inside_cond)
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    inner = sub if hasattr(sub, "eqns") else getattr(sub, "jaxpr", None)
                    if inner is not None:
                        inner = inner if hasattr(inner, "eqns") else inner.jaxpr
                        found += whole_cache_dots(inner.eqns,
                                                  inside_cond or eqn.primitive.name == "cond")
        return found

    found = whole_cache_dots(jaxpr.jaxpr.eqns, False)
    assert found and all(found), found  # some product reads the whole cache, only under cond
    assert any(e.primitive.name == "gather" for e in jaxpr_eqns(jaxpr.jaxpr))


def test_decode_refuses_prefill_arguments():
    make = delta()
    x = _x(3)
    m = make(True)
    variables = jax.jit(m.init)(jax.random.key(0), x)
    for kw in ({"segment_ids": jnp.ones((2, 3), int)}, {"positions": jnp.zeros((2, 3), int)}):
        with pytest.raises(ValueError, match="cannot be used with decode=True"):
            m.apply(variables, x, mutable=["cache"], **kw)
    with pytest.raises(ValueError, match="lengths is a decode argument"):
        make(False).apply({"params": variables["params"]}, x, lengths=jnp.array([1, 2]))


def test_the_usage_snippet_of_docs_decoding_runs():
    """The python block of docs/decoding.md's "Usage" section runs as written (its asserts
    included), so the documentation cannot rot."""
    doc = (pathlib.Path(__file__).parents[1] / "docs" / "decoding.md").read_text()
    usage = doc.split("## Usage", 1)[1]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    exec(compile(code, "docs/decoding.md", "exec"), {})
