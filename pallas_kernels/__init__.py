"""Fused Pallas attention kernels (block- and token-level sparse), each beside its jnp reference.

A standalone kernel library: array-in / array-out ops that import neither ``attnhut_jax`` nor
``parity``. The kernels arrive with the block-sparse and token-sparse issues.
"""
