"""Fused Pallas attention kernels (block- and token-level sparse), each beside its jnp reference.

A standalone kernel library: array-in / array-out ops that import neither ``attnhut_jax`` nor
``parity``. ``block_sparse/`` and ``token_sparse/`` each hold the Pallas kernels (GPU-style
Triton and TPU Mosaic), the pure-jnp reference they must equal, a plain-XLA path and the
on-device table builders; ``common.py`` is the contract they share (static configuration, fill
constants, padding, softmax pieces, table compaction, the VJP) and ``flash.py`` the Triton tile
loops. Every op takes ``precision`` (``jax.lax.PrecisionLike``, Flax's convention) for its
matrix products; softmax statistics and selector scores are float32 whatever the input dtype.

The dimension key: the one source for every array-name suffix and einsum string in this
project (``q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, w_DNH)``)::

    B batch                 T query length (a query tile inside a kernel is a slice of T: still T)
    S key length (a key tile is a slice of S: still S)         D model width
    N query heads           K kv heads / kv groups             G query heads per kv head (N = K*G)
    H query/key head width  V value head width                 R rope width
    L latent width (MLA kv rank)                               J key blocks (S / block size)
    C compressed entries    P positions pooled into one compressed entry
    M selected keys per query (top-k slots)                    W raw-window keys per query
    I indexer heads         E indexer head width
    A output-projection groups   Y per-group input width       O per-group output width
    U slots / objects       F frames (CJEPA)

and two letters that only the kernels' layouts need:

    Q query tiles (T / block_q)                                Z bitmask words (ceil(S / 32))

e.g. a kernel tile's logits ``s_GTS = jnp.einsum("GTH,SH->GTS", q_GTH, k_SH)``, never "GQK": K
is kv heads everywhere.
"""
