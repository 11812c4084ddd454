"""The README quickstart, runnable: build, init, apply, and move weights to and from attnhut."""

import attnhut
import jax
import jax.numpy as jnp
import numpy as np
import torch

from attnhut_jax import GroupedQueryAttention
from parity import from_torch, to_torch


def main() -> None:
    attn = GroupedQueryAttention(dim=512, num_heads=8, num_kv_heads=2)
    x = jnp.ones((2, 128, 512))
    variables = attn.init(jax.random.key(0), x)
    y = attn.apply(variables, x)
    print("flax GQA:", x.shape, "->", y.shape)

    torch.manual_seed(0)
    torch_attn = attnhut.GroupedQueryAttention(512, 8, 2, causal=True).eval()
    flax_attn, variables = from_torch(torch_attn)
    xs = np.random.default_rng(0).standard_normal((2, 64, 512)).astype(np.float32)
    with torch.no_grad():
        ref = torch_attn(torch.from_numpy(xs)).numpy()
    out = np.asarray(jax.jit(flax_attn.apply)(variables, jnp.asarray(xs)))
    print(f"max |flax - torch| = {np.abs(out - ref).max():.2e}")
    back = to_torch(flax_attn, variables)
    same = all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                 torch_attn.state_dict().values(), strict=True))
    print("round trip exact:", same)


if __name__ == "__main__":
    main()
