"""Shared checks of incremental decoding (``decode=True``): prefill == token-by-token decode ==
chunked prefill + single steps, rows of different prompt lengths, one compilation, cache bytes.

Every check takes ``make(decode: bool) -> nn.Module`` (the same module with decode on or off)
and compares float32 outputs within ``TOL`` relative to the output scale.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attnhut_jax import cache as cache_lib

TOL = 1e-5


def close(got, want, tol: float = TOL, what: str = "") -> None:
    """``got`` == ``want`` within ``tol`` times the scale of ``want``."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.all(np.isfinite(got)), what
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * scale {scale:.3g}"


# The jitted functions are kept per ``make`` so that the checks of one module share their
# compilations (test time); every check that counts compilations counts growth, not totals.


@functools.cache
def _jitted(make, decode: bool, method: str):
    return jax.jit(getattr(make(decode), method))


def params_of(make, x, seed: int = 0):
    """Parameters of the decode=False module on ``x`` (the trained weights)."""
    return _jitted(make, False, "init")(jax.random.key(seed), x)["params"]


def prefill(make, params, x):
    """The full causal forward (decode=False), jit-compiled."""
    return _jitted(make, False, "apply")({"params": params}, x)


def empty_cache(make, batch: int, max_len: int, dim: int):
    """An empty cache for (batch, max_len); checks that init creates the decode=False params."""
    return _jitted(make, True, "init")(jax.random.key(1), jnp.zeros((batch, max_len, dim)))


@functools.cache
def stepper(make):
    """A jit-compiled decode call: (params, cache, chunk, lengths) -> (out, cache); one per
    ``make`` (shared by the checks)."""
    m = make(True)

    @jax.jit
    def step(params, cache, x, lengths=None):
        out, state = m.apply({"params": params, "cache": cache}, x, mutable=["cache"],
                             lengths=lengths)
        return out, state["cache"]

    return step


def decode_in_chunks(make, params, x, chunks, max_len: int | None = None, step=None):
    """Outputs of appending ``x`` (B, T, D) in chunks of the given sizes (summing to T)."""
    b, t, d = x.shape
    assert sum(chunks) == t
    variables = empty_cache(make, b, max_len or t, d)
    cache = variables["cache"]
    step = step or stepper(make)
    outs, at = [], 0
    for n in chunks:
        out, cache = step(params, cache, x[:, at:at + n])
        outs.append(out)
        at += n
    return jnp.concatenate(outs, axis=1), cache


def check_decode_equals_prefill(make, x, *, chunks=None, tol: float = TOL, max_len=None):
    """prefill == token-by-token decode == ``chunks`` (default 3 uneven chunks, then single
    steps); a cache longer than the sequence (``max_len``) changes nothing."""
    b, t, _ = x.shape
    params = params_of(make, x)
    want = prefill(make, params, x)
    step = stepper(make)
    got, _ = decode_in_chunks(make, params, x, [1] * t, max_len, step=step)
    close(got, want, tol, "token by token")
    if chunks is None:
        a = max(1, t // 4)
        chunks = [a, max(1, t // 3), max(1, t // 5)]
        chunks = chunks + [1] * (t - sum(chunks))
    got, _ = decode_in_chunks(make, params, x, chunks, max_len, step=step)
    close(got, want, tol, f"chunks {chunks}")
    return params


def check_ragged_prompts(make, x, prompt_lengths, steps: int, *, tol: float = TOL):
    """Rows with prompts of different lengths: a first chunk with ``lengths``, then ``steps``
    single tokens per row; row b equals its prompt and continuation run alone."""
    b, t, d = x.shape
    lens = np.asarray(prompt_lengths)
    p = int(lens.max())
    assert p + steps <= t
    params = params_of(make, x)
    variables = empty_cache(make, b, p + steps, d)
    step = stepper(make)
    # row r: prompt x[r, :len_r], then the continuation x[r, p : p + steps]
    out0, cache = step(params, variables["cache"], x[:, :p], jnp.asarray(lens, jnp.int32))
    outs = []
    for i in range(steps):
        out, cache = step(params, cache, x[:, p + i:p + i + 1])
        outs.append(out)
    cont = jnp.concatenate(outs, axis=1)
    np.testing.assert_array_equal(np.asarray(cache["index"]), lens + steps)
    for r in range(b):
        seq = jnp.concatenate([x[r:r + 1, :lens[r]], x[r:r + 1, p:p + steps]], axis=1)
        want = prefill(make, params, seq)
        close(out0[r:r + 1, :lens[r]], want[:, :lens[r]], tol, f"row {r} prompt")
        close(cont[r:r + 1], want[:, lens[r]:], tol, f"row {r} continuation")
        assert np.all(np.asarray(out0[r, lens[r]:]) == 0), "tokens past a row's length give zeros"


def check_compiles_once(make, x, steps: int = 20):
    """A jit-compiled single-token step compiles once over ``steps`` steps."""
    b, _, d = x.shape
    params = params_of(make, x)
    cache = empty_cache(make, b, steps, d)["cache"]
    step = stepper(make)
    _, cache = step(params, cache, x[:, :1])
    compiled = step._cache_size()
    for i in range(1, steps):
        _, cache = step(params, cache, x[:, i % x.shape[1]][:, None])
    assert step._cache_size() == compiled, (compiled, step._cache_size())


def check_cache_bytes(make, batch: int, max_len: int, dim: int, dtype=jnp.float32):
    """The cache arrays' bytes equal the module's ``cache_bytes``; the init params equal the
    decode=False ones (same tree, shapes and dtypes)."""
    x = jnp.zeros((batch, max_len, dim))
    variables = _jitted(make, True, "init")(jax.random.key(0), x)
    plain = _jitted(make, False, "init")(jax.random.key(0), x)
    assert (jax.tree.structure(variables["params"]) == jax.tree.structure(plain["params"]))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), variables["params"]) == jax.tree.map(
        lambda a: (a.shape, a.dtype), plain["params"])
    jax.tree.map(np.testing.assert_array_equal, variables["params"], plain["params"])
    got = cache_lib.cache_arrays_bytes(variables["cache"])
    assert got == make(True).cache_bytes(batch, max_len, dtype), (
        got, make(True).cache_bytes(batch, max_len, dtype))
    assert np.all(np.asarray(variables["cache"]["index"]) == 0)
    return variables


def check_scanned_layers(make, x, chunks, layers: int):
    """``layers`` decoding layers stacked with ``nn.scan`` over a 'cache' axis (as over the
    params axis), fed ``x`` in ``chunks``, equal the stack's forward; returns the final cache."""
    import flax.linen as nn

    class Layer(nn.Module):
        decode: bool

        @nn.compact
        def __call__(self, h, _):
            return h + make(self.decode)(h), None

    def stack(decode):
        return nn.scan(Layer, variable_axes={"params": 0, "cache": 0},
                       split_rngs={"params": True}, length=layers)(decode)

    variables = jax.jit(stack(True).init)(jax.random.key(0), jnp.zeros(x.shape), None)
    want, _ = jax.jit(lambda p, x: stack(False).apply({"params": p}, x, None))(
        variables["params"], x)
    step = jax.jit(lambda c, a: stack(True).apply({"params": variables["params"], "cache": c}, a,
                                                  None, mutable=["cache"]))
    cache, outs, at = variables["cache"], [], 0
    for n in chunks:
        (out, _), state = step(cache, x[:, at:at + n])
        cache, at = state["cache"], at + n
        outs.append(out)
    close(jnp.concatenate(outs, axis=1), want, what="scanned layers")
    return cache
