"""Decoding the linear-attention layers equals transformers' own cached generation: the Gated
DeltaNet of Qwen3.5 and Kimi Delta Attention, a prompt chunk then single tokens through a stock
transformers cache (conv tail and recurrent state), against ours with ``decode=True`` fed the same
chunks (float32, within 1e-5 of the output scale)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from parity import from_torch
from parity.cases import hf_cache, kimi_delta, qwen_gdn

B, D, PROMPT, STEPS = 2, 16, 5, 6


@pytest.mark.parametrize("make", [qwen_gdn, kimi_delta], ids=["gdn-qwen3.5", "kda-kimi"])
def test_decode_equals_transformers_cached_generation(make):
    torch.manual_seed(0)
    layer = make().float()
    fm, variables = from_torch(layer)
    x = torch.from_numpy(np.random.default_rng(3).standard_normal(
        (B, PROMPT + STEPS, D), dtype=np.float32))
    cache = hf_cache(layer, torch.zeros(fm.state_shape(B)), replay=False)
    with torch.no_grad():
        want = [layer(x[:, :PROMPT], cache=cache)]
        for t in range(PROMPT, PROMPT + STEPS):
            want.append(layer(x[:, t:t + 1], cache=cache))
    want = torch.cat(want, dim=1).numpy()
    dec = fm.clone(decode=True)
    c = dec.init(jax.random.key(0), jnp.zeros((B, PROMPT + STEPS, D)))["cache"]
    step = jax.jit(lambda c, xt: dec.apply({"params": variables["params"], "cache": c}, xt,
                                           mutable=["cache"]))
    xj = jnp.asarray(x.numpy())
    got = []
    for lo, hi in [(0, PROMPT)] + [(t, t + 1) for t in range(PROMPT, PROMPT + STEPS)]:
        out, state = step(c, xj[:, lo:hi])
        c = state["cache"]
        got.append(out)
    got = np.asarray(jnp.concatenate(got, axis=1))
    err, scale = np.abs(got - want).max(), max(1.0, np.abs(want).max())
    assert err <= 1e-5 * scale, f"{err:.3g} > 1e-5 * {scale:.3g}"
