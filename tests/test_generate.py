"""Generation with the attention caches (examples/lm/generation.py): the greedy output and every
step's logits equal full forwards (decode=False) over the growing prefix, for two prompts of
different lengths prefilled in chunks; each jit-compiled function compiles once."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples.lm import LM, Config, Decoder, generate, rollout, sample
from tests import decode_harness as h

# Every causal mechanism of the training example.
MECHS = ("standard", "mqa", "gqa", "mla", "differential", "delta", "deepseek_sparse",
         "minimax_sparse", "heavily_compressed", "compressed_sparse", "gated_deltanet",
         "kimi_delta", "linear", "strided_sparse", "fixed_sparse", "sinkhorn", "spark")

PROMPTS = [[3, 17, 9, 30, 1], [8, 2, 25, 25, 14, 6, 31, 0, 19, 4, 12]]   # lengths 5 and 11
MAX_NEW = 10  # positions up to 20: cross blocks / entries of 4, windows of 8 and Delta's stride 16
# (one layer: a second costs compilation time; the sampling test runs two)


def tiny(attn: str) -> Config:
    cfg = Config(attn=attn, dim=16, depth=1, heads=4, kv_heads=2, tied_head=False, block_size=4,
                 window=8, compression_rate=4, index_dim=8, seq_len=32, num_keys=15,
                 num_values=16)
    cfg.validate()
    assert cfg.vocab == 32
    return cfg


def spread_params(cfg: Config):
    """Random parameters whose greedy rollouts vary (the default init gives near-uniform logits
    that repeat one token): the embeddings drawn at unit scale, every other matrix at
    1 / sqrt(fan-in) (numpy draws: nothing to compile), vectors (norms, biases, mixes) as
    initialised."""
    # initialised under jit: one compiled program, not every init op dispatched one by one
    params = jax.jit(LM(cfg).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    rng = np.random.default_rng(2)

    def redraw(path, p):
        if p.ndim < 2:
            return p
        name = jax.tree_util.keystr(path)
        scale = 1.0 if "embed" in name and "block" not in name else 1 / np.sqrt(p.shape[0])
        return jnp.asarray(rng.standard_normal(p.shape) * scale, p.dtype)

    return jax.tree_util.tree_map_with_path(redraw, params)


@pytest.mark.parametrize("attn", MECHS)
def test_greedy_generation_equals_the_rollout_of_full_forwards(attn):
    cfg = tiny(attn)
    params = spread_params(cfg)
    dec = Decoder(cfg)
    got = generate(cfg, params, PROMPTS, MAX_NEW, chunk=4, decoder=dec)  # 3 prefill chunks
    want, want_logits = rollout(cfg, params, PROMPTS, MAX_NEW)
    np.testing.assert_array_equal(got.tokens, want)
    assert len(set(want.reshape(-1).tolist())) > 4, "a rollout that repeats proves little"
    h.close(got.logits, want_logits, what=f"{attn}: the logits of every step")
    # the chunked prefill (3 chunks) and the step (9 steps) each compiled once
    assert dec.prefill._cache_size() == 1 and dec.step._cache_size() == 1


def test_sampling_follows_temperature_top_k_and_the_key():
    cfg = dataclasses.replace(tiny("standard"), depth=2)
    params = spread_params(cfg)
    key = jax.random.key(7)
    logits = jax.random.normal(key, (64, 32))
    np.testing.assert_array_equal(sample(logits, key, 1.0, 1), jnp.argmax(logits, -1))
    np.testing.assert_array_equal(sample(logits, key, 0.0, None), jnp.argmax(logits, -1))
    dec = Decoder(cfg, 1.5, 3)
    a = generate(cfg, params, PROMPTS, 8, temperature=1.5, top_k=3, key=key, decoder=dec)
    b = generate(cfg, params, PROMPTS, 8, temperature=1.5, top_k=3, key=key, decoder=dec)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    ranks = (a.logits > np.take_along_axis(a.logits, a.tokens[..., None], -1)).sum(-1)
    assert ranks.max() < 3, "a token outside the top 3 was drawn"
    # two layers: every step's logits are those of a full forward over the sampled sequence
    lens = [len(p) for p in PROMPTS]
    buf = np.zeros((2, max(lens) + 8), np.int32)
    for r, prompt in enumerate(PROMPTS):
        buf[r, :lens[r] + 8] = np.concatenate([prompt, a.tokens[r]])
    full = np.asarray(LM(cfg).apply({"params": params}, jnp.asarray(buf))[0])
    for r, n in enumerate(lens):
        h.close(a.logits[r], full[r, n - 1:n + 7], what=f"sampled row {r}")
    c = generate(cfg, params, PROMPTS, 8, temperature=1.5, top_k=3, key=jax.random.key(8),
                 decoder=dec)
    assert not np.array_equal(a.tokens, c.tokens)
    # many draws of one step follow softmax(logits / T) over the top k
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
    draws = jax.vmap(lambda k: sample(logits, k, 2.0, 3)[0])(
        jax.random.split(jax.random.key(0), 4000))
    freq = np.bincount(np.asarray(draws), minlength=4) / 4000
    p = np.exp(np.array([1.0, 0.5, 0.0])) / np.exp(np.array([1.0, 0.5, 0.0])).sum()
    np.testing.assert_allclose(freq[:3], p, atol=0.03)
    assert freq[3] == 0


def test_decode_mode_refuses_what_it_cannot_do():
    cfg = tiny("standard")
    params = spread_params(cfg)
    m = LM(cfg, decode=True)
    with pytest.raises(ValueError, match="decode cache of length 33 is longer than seq_len=32"):
        m.init(jax.random.key(0), jnp.zeros((1, 33), jnp.int32))
    variables = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((2, 8), jnp.int32))
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)  # noqa: E731
    assert shapes(variables["params"]) == shapes(params)
    variables = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), variables)
    for kw in ({"with_aux": True}, {"segment_ids": jnp.ones((2, 3), jnp.int32)},
               {"positions": jnp.zeros((2, 3), jnp.int32)}):
        with pytest.raises(ValueError, match="cannot be used with decode=True"):
            m.apply({"params": params, "cache": variables["cache"]}, jnp.zeros((2, 3), jnp.int32),
                    mutable=["cache"], **kw)
    with pytest.raises(ValueError, match="no room"):
        generate(cfg, params, PROMPTS, 5, max_len=12)
    with pytest.raises(ValueError, match="longer than the model's position embedding"):
        generate(cfg, params, PROMPTS, 30)
    with pytest.raises(ValueError, match="at least one token"):
        generate(cfg, params, [[1, 2], []], 3)


def test_decode_table_reports_the_modules_own_accounting():
    from examples import decode_table as dt

    rows, missing = dt.measure(lengths=(4096, 131072))
    assert set(rows) | set(missing) == set(dt.MECHANISMS) and "standard" in rows
    for name in missing:
        assert not dt.can_account(dt.build(name))
    for name, r in rows.items():
        m = dt.build(name)
        assert r["reads"] == [m.decode_reads(4096), m.decode_reads(131072)]
        assert all(0 < x <= n for x, n in zip(r["reads"], (4096, 131072), strict=True)), name
        assert all(0 <= x <= n for x, n in zip(r["scored"], (4096, 131072), strict=True)), name
    # attention-forge's figure: an MHA cache at T = 4096, 32 layers, 32 heads of 128, fp16 is
    # 2 GiB (plus each layer's int32 position counter)
    fp16, _ = dt.measure(["standard"], lengths=(4096,), dtype=jnp.float16)
    assert fp16["standard"]["bytes_per_token"][0] * 4096 * 32 == 2 * 2**30 + 32 * 4
    text = dt.table()
    assert "| `standard` | `StandardAttention` | 16,384 |" in text
    assert all(f"| `{name}` |" in text for name in rows)
    assert all(f"`{name}`" in text.split("No decode accounting yet")[-1] for name in missing)


def test_the_generate_example_trains_then_samples(capsys):
    from examples import generate as example

    out = example.main(["--attn", "gqa", "--steps", "0", "--dim", "16", "--depth", "1",
                        "--seq-len", "48", "--batch-size", "2", "--eval-batches", "1",
                        "--no-progress", "--max-new", "3", "--num-prompts", "2"])
    text = capsys.readouterr().out
    assert out["tokens"].shape == (2, 3) and out["asked"] == 2
    assert "recall answers right" in text and "tokens/s" in text
    assert example.parse_prompt(out["cfg"], "k3 v5 _ k3") == [4, 1 + 32 + 5, 0, 4]
    with pytest.raises(ValueError, match="not a recall token"):
        example.parse_prompt(out["cfg"], "k3 hello")
