"""The dense modules' ``impl="cudnn"`` and ``"auto"`` on a GPU: do they compile to cuDNN's fused
attention, and do they compute what ``impl="xla"`` computes (same variables)?

For Standard, MQA, GQA, MLA (and Differential, which cuDNN cannot take: V = 2H) in bfloat16,
causal and not, with and without a boolean mask: the compiled HLO is searched for cuDNN's fused
attention call, and outputs and input gradients are compared with the XLA impl. Off a GPU every
``cudnn`` row prints the module's error (why it cannot run) and ``auto`` equals ``xla``.

    python benchmarks/cudnn_check.py
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

import attnhut_jax as ah

D, B, T = 128, 2, 64
MODULES = {
    "standard": lambda **kw: ah.StandardAttention(D, 2, **kw),
    "mqa": lambda **kw: ah.MultiQueryAttention(D, 2, **kw),
    "gqa": lambda **kw: ah.GroupedQueryAttention(D, 4, 2, **kw),
    "mla": lambda **kw: ah.MultiHeadLatentAttention(D, 2, **kw),
    "differential": lambda **kw: ah.DifferentialAttention(D, 2, **kw),
}


def check(name: str, causal: bool, masked: bool, impl: str, x, mask) -> str:
    make = MODULES[name]
    ref_m = make(causal=causal, impl="xla", dtype=jnp.bfloat16)
    m = make(causal=causal, impl=impl, dtype=jnp.bfloat16)
    v = ref_m.init(jax.random.key(1), x)
    kw = {"attn_mask": mask} if masked else {}

    def loss(mod):
        return lambda x: mod.apply(v, x, **kw).astype(jnp.float32).sum()

    try:
        fwd = jax.jit(lambda x: m.apply(v, x, **kw))
        hlo = fwd.lower(x).compile().as_text().lower()
        out, g = fwd(x), jax.jit(jax.grad(loss(m)))(x)
    except ValueError as e:
        return f"refused: {e}"
    ref, g_ref = jax.jit(lambda x: ref_m.apply(v, x, **kw))(x), jax.jit(jax.grad(loss(ref_m)))(x)
    same_vars = jax.tree.structure(m.init(jax.random.key(1), x)) == jax.tree.structure(v)
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
    g_err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - g_ref.astype(jnp.float32))))
    # the fused attention is a custom call (this file's own name shows up in op metadata)
    cudnn = re.search(r'custom_call_target="[^"]*(cudnn|fmha)', hlo) is not None
    return (f"cuDNN in HLO: {'yes' if cudnn else 'no ':3}  |out - xla| {err:.4f}  "
            f"|dx - xla| {g_err:.4f}  same variables: {same_vars}")


def main() -> None:
    print(f"jax {jax.__version__}, devices {jax.devices()}")
    x = jax.random.normal(jax.random.key(0), (B, T, D), jnp.bfloat16)
    mask = jax.random.bernoulli(jax.random.key(3), 0.7, (T, T)).at[:, 0].set(True)
    for name in MODULES:
        for causal in (True, False):
            for masked in (False,) if name == "differential" else (False, True):  # no mask arg
                for impl in ("cudnn", "auto"):
                    row = check(name, causal, masked, impl, x, mask)
                    print(f"{name:<13} causal={causal!s:<5} mask={masked!s:<5} {impl:<6} {row}")


if __name__ == "__main__":
    main()
