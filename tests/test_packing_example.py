"""The training example's packed rows and in-layer index losses: packed batches are well formed,
a packed row's logits equal its documents run alone (every layer, embeddings and token shift
included), and a packed train step with each selector's index loss trains the selector."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples import lm  # noqa: E402
from examples.lm.data import packed_batch, recall_document  # noqa: E402

TINY = lm.Config(dim=32, depth=2, heads=4, kv_heads=2, seq_len=64, num_pairs=2, num_queries=2,
                 num_keys=8, num_values=8, batch_size=2, block_size=8, window=8,
                 compression_rate=4, index_dim=8, top_k=2, steps=2, warmup=1, eval_batches=1,
                 progress=False, impl="xla", pack=True, doc_len=20)


def _packed(cfg, seed=0, rows=2):
    return packed_batch(np.random.default_rng(seed), cfg, rows,
                        lambda r, n: recall_document(r, cfg, n))


@pytest.mark.parametrize("attn,align", [("gqa", 1), ("minimax_sparse", 8),
                                        ("compressed_sparse", 4), ("delta", 16)])
def test_packed_batches_are_well_formed(attn, align):
    cfg = dataclasses.replace(TINY, attn=attn)
    b = _packed(cfg, rows=4)
    assert cfg.pack_align == align
    for r in range(4):
        seg, pos = b["segment_ids"][r], b["positions"][r]
        ids = [i for i in np.unique(seg) if i]
        assert ids == list(range(1, len(ids) + 1)) and len(ids) >= 2, seg
        for i in ids:
            where = np.flatnonzero(seg == i)
            start, n = where[0], len(where)
            assert start % align == 0 and np.array_equal(where, start + np.arange(n))
            assert np.array_equal(pos[where], np.arange(n))
            assert n >= cfg.min_doc_len
            # targets stay inside the document; its last token predicts nothing
            assert np.array_equal(b["targets"][r, where[:-1]], b["tokens"][r, where[1:]])
            assert b["weights"][r, where[-1]] == 0
            assert b["weights"][r, where].sum() == cfg.num_queries
        assert np.all(b["weights"][r, seg == 0] == 0) and np.all(b["tokens"][r, seg == 0] == 0)


# every module's own packing is tested beside it (tests/test_packing_*.py, test_msa_training.py,
# test_dsa_training.py); here the whole LM around them: embeddings, token shift, every layer
@pytest.mark.parametrize("attn", ["minimax_sparse", "compressed_sparse", "gated_deltanet",
                                  "kimi_delta", "linear"])
def test_packed_row_equals_its_documents_alone(attn):
    cfg = dataclasses.replace(TINY, attn=attn, depth=1)
    b = _packed(cfg, seed=1, rows=1)
    model = lm.LM(cfg)
    tokens = jnp.asarray(b["tokens"])
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
    packed, _ = jax.jit(lambda p: model.apply({"params": p}, tokens,
                                              segment_ids=jnp.asarray(b["segment_ids"]),
                                              positions=jnp.asarray(b["positions"])))(params)
    assert np.all(np.isfinite(np.asarray(packed)))
    seg = b["segment_ids"][0]
    alone_fn = jax.jit(lambda p, tok: model.apply({"params": p}, tok))
    for i in (1, 2):  # the first document and one at an aligned offset
        where = np.flatnonzero(seg == i)
        alone, _ = alone_fn(params, tokens[:, where])
        np.testing.assert_allclose(np.asarray(packed[0, where]), np.asarray(alone[0]),
                                   rtol=1e-5, atol=1e-5, err_msg=f"document {i}")


INDEX_PARAMS = {"minimax_sparse": "idx_q", "deepseek_sparse": "indexer", "compressed_sparse": "idx_q"}


# (MiniMax's loss through the example: tests/test_train.py)
@pytest.mark.parametrize("attn,loss", [("deepseek_sparse", "dense"), ("compressed_sparse", "sparse")])
def test_packed_step_trains_the_selector_with_its_index_loss(attn, loss):
    cfg = dataclasses.replace(TINY, attn=attn, index_loss=loss, depth=1)
    trainer = lm.Trainer.build(cfg, lm.make_mesh({"data": 1, "model": 1}, jax.devices()[:1]))
    batch = lm.Data(cfg, trainer).train_batch(0)
    params = trainer.init_state()["params"]
    grads, metrics = jax.jit(jax.grad(lambda p: lm.loss_fn(trainer.model, cfg, p, batch, True),
                                      has_aux=True))(params)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["aux"]) > 0, metrics
    index_grads = jax.tree.leaves(grads["block_0"]["attn"][INDEX_PARAMS[attn]])
    assert all(np.all(np.isfinite(np.asarray(g))) for g in index_grads)
    assert any(np.any(np.asarray(g) != 0) for g in index_grads)
    state, m = trainer.train_step(trainer.init_state(), batch)
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))


def test_packing_flags_fail_clearly():
    with pytest.raises(ValueError, match="bigbird cannot take packed rows"):
        dataclasses.replace(TINY, attn="bigbird").validate()
    with pytest.raises(ValueError, match="index-loss dense"):
        dataclasses.replace(TINY, attn="minimax_sparse", index_loss="dense").validate()
    with pytest.raises(ValueError, match="index-loss"):
        dataclasses.replace(TINY, attn="deepseek_sparse", index_loss="full").validate()
