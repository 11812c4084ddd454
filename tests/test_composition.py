"""Every mechanism composes as models use it: inside ``nn.scan`` over layers (stacked parameters,
one compiled layer body, with the usual ``variable_axes={"params": 0}`` and no metadata
parameters) and under ``nn.remat``, forward and gradient equal to the unrolled stack of plain
layers. One test holds both wrappers, as models use them (``nn.scan(nn.remat(Layer))``), so each
mechanism compiles once per wrapper pair."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_interop import MECHANISMS, _call_args

LAYERS = 2  # the scan's carry crosses a layer boundary; more layers only add compile time
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
def test_scanned_rematerialised_layers_equal_the_unrolled_stack(name):
    factory, shape = MECHANISMS[name]
    x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    args = _call_args(name, x)
    stack = _stack(name, remat=True)
    # initialised under jit: one compiled program instead of every init op dispatched (and
    # compiled) one by one
    v = jax.jit(stack.init)(jax.random.key(0), x, *args)
    params = nn.unbox(v)["params"]
    assert all(a.shape[0] == LAYERS for a in jax.tree.leaves(params))
    # the layer axis is unnamed (replicated); the mechanism's own logical axes follow it
    box = jax.tree.leaves(v, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))[0]
    assert box.names[0] is None and len(box.names) == box.value.ndim
    layer = _layer(factory)()
    # remat changes no variable: a plain layer takes each slice of the stacked parameters
    one = nn.unbox(jax.eval_shape(layer.init, jax.random.key(0), x, *args))["params"]
    assert jax.tree.structure(one) == jax.tree.structure(params)

    def unrolled(params, x):
        h, ys = x, []
        for i in range(LAYERS):
            h, y = layer.apply({"params": jax.tree.map(lambda a, i=i: a[i], params)}, h, *args)
            ys.append(y)
        return h, jnp.stack(ys)

    def run(f, p, x):  # the outputs and the gradient of a loss of them
        def loss(p, x):
            out = f(p, x)
            return sum(jnp.sum(jnp.square(a)) for a in out), out
        return jax.grad(loss, argnums=(0, 1), has_aux=True)(p, x)

    @jax.jit  # both stacks in one compiled program
    def both(p, x):
        return (run(lambda p, x: stack.apply({"params": p}, x, *args), p, x),
                run(unrolled, p, x))

    (g_scan, out_scan), (g_unrolled, out_unrolled) = both(params, x)
    for a, b in zip(out_scan, out_unrolled, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4,
                                                         rtol=1e-4), g_scan, g_unrolled)
