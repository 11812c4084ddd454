"""BigBird, Slot and CausalJEPA refuse ``decode=True`` with the reason; ``decode=False`` (the
default, the last field) changes nothing."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnhut_jax as ah
from attnhut_jax.bigbird import bigbird_block_mask

D = 16


def _bigbird(causal, decode=False):
    return ah.BigBirdAttention(D, 2, block_size=2, num_window_blocks=3, num_random_blocks=2,
                               num_global_blocks=1, causal=causal, decode=decode)


REFUSED = {
    "bigbird": (lambda dec: _bigbird(False, dec), lambda: (jnp.zeros((2, 8, D)),),
                r"BigBirdAttention cannot decode incrementally \(decode=True\): with causal=False "
                r"its outputs change as the sequence grows.*depends on the total length"),
    "bigbird_causal": (lambda dec: _bigbird(True, dec), lambda: (jnp.zeros((2, 8, D)),),
                       r"not implemented for causal=True: the causal block pattern is the same "
                       r"for every prefix"),
    "slot": (lambda dec: ah.SlotAttention(D, 3, decode=dec), lambda: (jnp.zeros((2, 5, D)),),
             r"SlotAttention cannot decode incrementally.*slots compete for all inputs at once.*"
             r"no causal order"),
    "cjepa": (lambda dec: ah.CausalJEPAAttention(D, 2, 3, 2, depth=1, decode=dec),
              lambda: (jnp.zeros((2, 2, 3, D)),),
              r"CausalJEPAAttention cannot decode incrementally.*not a causal mask: every block "
              r"attends bidirectionally over the whole"),
}
REFUSED.update({
    "sinkhorn": (lambda dec: ah.SinkhornAttention(D, 2, 2, max_len=8, decode=dec),
                 lambda: (jnp.zeros((2, 8, D)),),
                 r"SinkhornAttention cannot decode incrementally \(decode=True\): with "
                 r"causal=False every block's sorted keys depend on the whole sequence"),
    "sinkhorn_causal": (lambda dec: ah.SinkhornAttention(D, 2, 2, causal=True, max_len=8,
                                                         decode=dec),
                        lambda: (jnp.zeros((2, 8, D)),),
                        r"not implemented for causal=True: row i of the causal Sinkhorn matrix "
                        r"depends only on blocks before block i"),
})
RNGS = {"params": jax.random.key(0), "slots": jax.random.key(1), "mask": jax.random.key(2)}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_decode_true_is_refused_with_the_reason(name):
    make, args, why = REFUSED[name]
    with pytest.raises(ValueError, match=why):
        make(True).init(RNGS, *args())


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_decode_is_the_last_field_and_off_by_default(name):
    """The positional order of the existing fields is kept; decode=False creates no cache (its
    params and outputs are checked by the modules' own and parity tests)."""
    make, args, _ = REFUSED[name]
    fields = [f.name for f in dataclasses.fields(make(False)) if f.name not in ("parent", "name")]
    assert fields[-1] == "decode" and "decode" not in fields[:-1]
    assert fields[-2] == "precision"
    assert {f.name: f.default for f in dataclasses.fields(type(make(False)))}["decode"] is False
    assert set(make(False).init(RNGS, *args())) == {"params"}


def test_bigbird_reasons_hold():
    """What the two refusals state: a bidirectional BigBird's pattern (and a prefix's outputs)
    change as the row grows; a causal one's are the same for every prefix."""
    big = {c: bigbird_block_mask(24, 3, 2, 1, c, 0) for c in (False, True)}
    for m in range(1, 24):
        assert np.array_equal(bigbird_block_mask(m, 3, 2, 1, True, 0), big[True][:m, :m])
    assert any(not np.array_equal(bigbird_block_mask(m, 3, 2, 1, False, 0), big[False][:m, :m])
               for m in range(1, 24))
    x = jax.random.normal(jax.random.key(0), (1, 20, D))
    for causal in (False, True):
        m = _bigbird(causal)
        variables = m.init(jax.random.key(1), x)
        run = jax.jit(m.apply)
        full = run(variables, x)
        diffs = [float(jnp.abs(run(variables, x[:, :t]) - full[:, :t]).max()) for t in (11,)]
        if causal:
            assert max(diffs) <= 1e-6, diffs
        else:
            assert max(diffs) > 1e-3, diffs
