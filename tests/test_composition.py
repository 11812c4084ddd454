"""Every mechanism composes as models use it: inside ``nn.scan`` over layers (stacked parameters,
one compiled layer body, with the usual ``variable_axes={"params": 0}`` and no metadata
parameters) and under ``nn.remat``, forward and gradient equal to the unrolled stack."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_interop import MECHANISMS, _call_args

LAYERS = 3
NAMES = [n for n in MECHANISMS if n not in ("lightning_indexer", "grouped_output")]


def _layer(factory, remat=False):
    cls = factory()
    mod_cls = nn.remat(type(cls)) if remat else type(cls)
    fields = {f: getattr(cls, f) for f in cls.__dataclass_fields__ if f not in ("parent", "name")}

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, *args):
            y = _output_of(mod_cls(**fields, name="attn")(x, *args))
            # residual where the mechanism maps the input's shape to itself; otherwise the layer
            # passes its input on and emits the mechanism's output
            return (x + y if y.shape == x.shape else x), y

    return Layer


def _output_of(y):
    return y[0] if isinstance(y, tuple) else y


def _stack(name, remat=False):
    layer = _layer(MECHANISMS[name][0], remat)
    nargs = len(_call_args(name, jnp.zeros(MECHANISMS[name][1])))
    return nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast,) * nargs, length=LAYERS)()


@pytest.mark.parametrize("name", NAMES)
def test_scan_over_layers_equals_the_unrolled_stack(name):
    factory, shape = MECHANISMS[name]
    x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    args = _call_args(name, x)
    stack = _stack(name)
    v = stack.init(jax.random.key(0), x, *args)
    params = nn.unbox(v)["params"]
    assert all(a.shape[0] == LAYERS for a in jax.tree.leaves(params))
    # the layer axis is unnamed (replicated); the mechanism's own logical axes follow it
    box = jax.tree.leaves(v, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))[0]
    assert box.names[0] is None and len(box.names) == box.value.ndim
    layer = _layer(factory)()

    def unrolled(params, x):
        h, ys = x, []
        for i in range(LAYERS):
            h, y = layer.apply({"params": jax.tree.map(lambda a, i=i: a[i], params)}, h, *args)
            ys.append(y)
        return h, jnp.stack(ys)

    def loss(f):
        return lambda p, x: sum(jnp.sum(jnp.square(a)) for a in f(p, x))

    scanned = jax.jit(lambda p, x: stack.apply({"params": p}, x, *args))
    for a, b in zip(scanned(params, x), jax.jit(unrolled)(params, x), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    g_scan = jax.jit(jax.grad(loss(lambda p, x: stack.apply({"params": p}, x, *args)),
                              argnums=(0, 1)))(params, x)
    g_unrolled = jax.jit(jax.grad(loss(unrolled), argnums=(0, 1)))(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4,
                                                         rtol=1e-4), g_scan, g_unrolled)


@pytest.mark.parametrize("name", NAMES)
def test_remat_equals_the_plain_module(name):
    factory, shape = MECHANISMS[name]
    x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    args = _call_args(name, x)
    plain, remat = _layer(factory)(), _layer(factory, remat=True)()
    v = plain.init(jax.random.key(0), x, *args)
    assert jax.tree.structure(remat.init(jax.random.key(0), x, *args)) == jax.tree.structure(v)

    def loss(m):
        return lambda v, x: jnp.sum(jnp.square(m.apply(v, x, *args)[1]))

    out = jax.jit(lambda v, x: remat.apply(v, x, *args))(v, x)
    np.testing.assert_array_equal(np.asarray(out[1]),
                                  np.asarray(jax.jit(lambda v, x: plain.apply(v, x, *args))(v, x)[1]))
    g_r = jax.jit(jax.grad(loss(remat), argnums=(0, 1)))(v, x)
    g_p = jax.jit(jax.grad(loss(plain), argnums=(0, 1)))(v, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5,
                                                         rtol=1e-5), g_r, g_p)
