"""Core math against torch: RoPE and lambda_init as attnhut's, RMSNorm as torch's."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import attnhut_jax as ah
from attnhut_jax import core


def test_rope_matches_attnhut():
    import torch
    from attnhut.rope import apply_rope, build_rope_cache

    x = np.random.default_rng(0).standard_normal((2, 3, 5, 6)).astype(np.float32)  # B N T H
    cos, sin = build_rope_cache(torch.arange(5), 6, 500.0)
    ref = apply_rope(torch.from_numpy(x), cos, sin).numpy()
    c, s = core.rope_tables(jnp.arange(5), 6, 500.0)
    got = core.apply_rope(jnp.asarray(x.transpose(0, 2, 1, 3)), c, s)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 2, 1, 3), ref, atol=1e-6)


def test_rms_norm_matches_torch():
    import torch

    x = np.random.default_rng(0).standard_normal((3, 7)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal(7).astype(np.float32)
    ref = torch.nn.functional.rms_norm(torch.from_numpy(x), (7,), torch.from_numpy(w), 1e-6)
    np.testing.assert_allclose(np.asarray(core.rms_norm(jnp.asarray(x), jnp.asarray(w))),
                               ref.numpy(), atol=1e-6)


def test_lambda_init_matches_attnhut():
    import attnhut.differential as td

    for depth in range(12):
        assert ah.lambda_init(depth) == td.lambda_init(depth)
        assert ah.DifferentialAttention(8, 1, depth=depth).lambda_init == td.lambda_init(depth)
