"""Incremental decoding of the linear-attention modules (GatedDeltaNet, KimiDeltaAttention,
causal LinearAttention): decode == prefill token by token and in chunks, ragged prompts, one
compilation, the cache's bytes (a fixed-size state and conv tail, whatever max_len), an
unbounded room, the cached state == ``return_state``, the refused arguments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnhut_jax as ah
from tests import decode_harness as h

D = 16
# the decode logic is under test, not the op's impls (test_linear_modules compares those)
LINEAR = {
    "gdn": lambda dec: ah.GatedDeltaNet(D, 2, 4, 4, 3, impl="recurrent", decode=dec),
    "kda": lambda dec: ah.KimiDeltaAttention(D, 2, 4, conv_size=3, impl="recurrent",
                                             decode=dec),
    "linear": lambda dec: ah.LinearAttention(D, 2, bias=True, impl="recurrent", decode=dec),
}


def _x(t, b=2, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, t, D))


@pytest.mark.parametrize("name", sorted(LINEAR))
def test_decode_equals_prefill_and_the_cache_is_the_returned_state(name):
    """Token by token and in chunks, from a cache sized for 2 tokens (its arrays do not grow:
    the room is unbounded); after the sequence the cached ``state`` is the prefill's
    ``return_state`` and the conv tail the last conv inputs."""
    make = LINEAR[name]
    x = _x(9)
    params = h.check_decode_equals_prefill(make, x, max_len=2)
    got, cache = h.decode_in_chunks(make, params, x, [1] * 9, max_len=2)
    assert cache["index"].tolist() == [9, 9]
    want, state = jax.jit(lambda p, a: make(False).apply({"params": p}, a, return_state=True))(
        params, x)
    h.close(cache["state"], state, what="cached state")
    if "conv" in cache:
        k1 = cache["conv"].shape[1]
        qkv = jax.jit(lambda p, a: make(False).apply({"params": p}, a, method=_conv_inputs))(
            params, x)
        h.close(cache["conv"], qkv[:, -k1:], what="conv tail")


def _conv_inputs(m, x):
    """The short conv's input (B, T, C) of a GatedDeltaNet or KimiDeltaAttention."""
    return m.in_proj_qkv(x) if isinstance(m, ah.GatedDeltaNet) else m._qkv(x)


@pytest.mark.parametrize("name", sorted(LINEAR))
def test_ragged_prompts(name):
    h.check_ragged_prompts(LINEAR[name], _x(9, b=3), [6, 1, 6], steps=3)


@pytest.mark.parametrize("name", sorted(LINEAR))
def test_compiles_once_bytes_and_params(name):
    """One compilation over 12 steps; ``cache_bytes`` is the cache's arrays, the same for any
    max_len; the decode params are the decode=False ones; reads per step are constant."""
    h.check_compiles_once(LINEAR[name], _x(4), steps=12)
    variables = h.check_cache_bytes(LINEAR[name], 2, 9, D)
    m = LINEAR[name](True)
    assert m.cache_bytes(2, 9, jnp.float32) == m.cache_bytes(2, 10 ** 6, jnp.float32)
    assert m.kv_cache_bytes_per_token() == 0.0
    assert m.decode_reads(10) == m.decode_reads(10 ** 6) and m.decode_scored(10 ** 6) == 0
    state = variables["cache"]["state"]
    assert state.dtype == jnp.float32 and state.shape == m.state_shape(2)


@pytest.mark.parametrize("name", sorted(LINEAR))
def test_decode_refuses_state_and_packing_arguments(name):
    m = LINEAR[name](True)
    x = _x(3)
    variables = h.empty_cache(LINEAR[name], 2, 3, D)
    for kw in ({"initial_state": jnp.zeros(m.state_shape(2))}, {"return_state": True},
               {"segment_ids": jnp.ones((2, 3), jnp.int32)}):
        with pytest.raises(ValueError, match="cannot be used with decode=True"):
            m.apply(variables, x, mutable=["cache"], **kw)
    with pytest.raises(ValueError, match="needs the 'cache' collection"):
        m.apply({"params": variables["params"]}, x, mutable=["cache"])


@pytest.mark.parametrize("impl", ["chunk", "pallas"])
def test_chunks_run_the_modules_impl(impl):
    """A chunk of several tokens runs the module's ``impl`` (a single token the recurrence):
    decoding in chunks that cross the op's chunk boundaries (chunk_size 4) equals prefill."""
    make = _CHUNKED[impl]
    x = _x(9, seed=2)
    params = h.params_of(make, x)
    got, _ = h.decode_in_chunks(make, params, x, [6, 1, 2])
    h.close(got, h.prefill(LINEAR["kda"], params, x), what=f"kda impl={impl}")


@pytest.mark.parametrize("name", sorted(LINEAR))
def test_tokens_past_a_rows_length_are_not_read(name):
    """A chunk step with ``lengths``: NaN and inf in the tokens past each row's length change
    neither the row's outputs nor the cache (the chunked impl: its products would carry a NaN
    into every token of the chunk if the op let a skipped token in)."""
    make = {"gdn": lambda dec: ah.GatedDeltaNet(D, 2, 4, 4, 3, impl="chunk", chunk_size=4,
                                                decode=dec),
            "kda": _CHUNKED["chunk"],
            "linear": lambda dec: ah.LinearAttention(D, 2, impl="chunk", chunk_size=4,
                                                     decode=dec)}[name]
    x = _x(7, seed=3)
    params = h.params_of(make, x)
    cache = h.empty_cache(make, 2, 8, D)["cache"]
    lengths = jnp.array([5, 2])
    clean = x.at[0, 5:].set(0.0).at[1, 2:].set(0.0)
    poisoned = x.at[0, 5:].set(jnp.nan).at[1, 2:].set(jnp.inf).at[1, 4].set(-jnp.inf)
    step = h.stepper(make)
    want, want_cache = step(params, cache, clean, lengths)
    got, got_cache = step(params, cache, poisoned, lengths)
    for row, n in enumerate(lengths.tolist()):
        np.testing.assert_array_equal(np.asarray(got[row, :n]), np.asarray(want[row, :n]))
    for key in want_cache:
        np.testing.assert_array_equal(np.asarray(got_cache[key]), np.asarray(want_cache[key]),
                                      err_msg=key)


_CHUNKED = {impl: (lambda dec, impl=impl: ah.KimiDeltaAttention(
    D, 2, 4, conv_size=3, impl=impl, chunk_size=4, decode=dec)) for impl in ("chunk", "pallas")}


def test_bidirectional_linear_attention_refuses_decode():
    with pytest.raises(ValueError, match="decode=True needs causal=True"):
        ah.LinearAttention(D, 2, causal=False, decode=True).init(jax.random.key(0), _x(3))


def test_layers_stacked_with_nn_scan_decode_like_their_forward():
    """GatedDeltaNet layers stack with ``nn.scan`` over a 'cache' axis as the softmax ones."""
    cache = h.check_scanned_layers(LINEAR["gdn"], _x(6), chunks=(3, 1, 2), layers=2)
    index = [a for path, a in jax.tree_util.tree_leaves_with_path(cache)
             if "index" in jax.tree_util.keystr(path)]
    assert [np.asarray(a).tolist() for a in index] == [[[6, 6], [6, 6]]]
