"""examples/compare.py and examples/patterns.py draw real PNGs; the read maps mean what they say."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples import compare, lm, patterns  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
SMALL = ["--seq-len", "32", "--dim", "32", "--depth", "1"]


def test_compare_draws_curves_and_table(tmp_path):
    out = tmp_path / "cmp.png"
    rows = compare.main(["--attn", "mqa", "--steps", "4", "--eval-every", "2",
                         "--batch-size", "8", "--out", str(out), *SMALL])
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000
    assert "| `mqa` |" in out.with_suffix(".md").read_text()
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [r["attn"] for r in saved] == ["mqa"] == [r["attn"] for r in rows]
    assert len(saved[0]["train_loss"]) == 4
    assert [e["step"] for e in saved[0]["evals"]] == [0, 2, 4]
    with pytest.raises(ValueError, match="'flash'"):
        compare.main(["--attn", "standard,flash"])


def test_kv_cache_bytes():
    kv = {a: lm.kv_cache_bytes_per_token(dataclasses.replace(lm.Config(), attn=a))
          for a in lm.MECHANISMS}
    # dim 64, 4 heads of 16, 2 kv heads, 2 layers, bf16
    assert kv["standard"] == 2 * 64 * 2 * 2
    assert kv["standard"] == 2 * kv["gqa"] == 4 * kv["mqa"]
    assert kv["mla"] == (64 // 4 + 16 // 2) * 2 * 2
    assert kv["heavily_compressed"] < kv["compressed_sparse"] < kv["mqa"]


def test_patterns_draws_selections(tmp_path):
    out = tmp_path / "p.png"
    views = patterns.main(["--attn", "deepseek_sparse,heavily_compressed", "--steps", "0",
                           "--out", str(out), "--impl", "reference", "--batch-size", "8",
                           *SMALL])
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000
    assert set(views) == {"deepseek_sparse", "heavily_compressed"}
    assert all(0.0 <= v <= 1.0 for v in views.values())
    with pytest.raises(ValueError, match="'gqa'"):
        patterns.main(["--attn", "gqa", "--out", str(out)])


CFG = dataclasses.replace(lm.Config(), seq_len=16, window=4, compression_rate=4, block_size=4)


def test_read_map_of_heavily_compressed():
    m = lm.key_read_map(dataclasses.replace(CFG, attn="heavily_compressed"), None, 16)
    # query 9: raw window 6..9; entries 0 and 1 (runs 0..3, 4..7) are complete, entry 2 is not
    np.testing.assert_array_equal(m[9], [.5] * 6 + [1.0] * 4 + [0.0] * 6)
    assert np.all(np.triu(m, 1) == 0)


def test_read_map_of_compressed_sparse_follows_the_selection():
    sel = np.zeros((16, 4), bool)
    sel[12, 1] = True  # query 12 keeps entry 1 only: it pools runs 1 and 0 (overlap)
    m = lm.key_read_map(dataclasses.replace(CFG, attn="compressed_sparse"), sel, 16)
    np.testing.assert_array_equal(m[12], [.5] * 8 + [0.0] * 1 + [1.0] * 4 + [0.0] * 3)
    np.testing.assert_array_equal(m[3], [1.0] * 4 + [0.0] * 12)


def test_read_map_of_delta_and_bigbird():
    cfg = dataclasses.replace(CFG, attn="delta")
    m = lm.key_read_map(cfg, None, 16)
    stride = lm.make_attention(cfg, 0).stride  # 16: anchor of every row here is 0
    assert stride == 16
    np.testing.assert_array_equal(m[9], [1.0] * 4 + [0.0] * 2 + [1.0] * 4 + [0.0] * 6)
    big = dataclasses.replace(CFG, attn="bigbird")
    mb = lm.key_read_map(big, None, 16)
    blocks = lm.make_attention(big, big.depth - 1).block_mask(4)  # the last layer's seed
    np.testing.assert_array_equal(mb > 0, np.repeat(np.repeat(blocks, 4, 0), 4, 1)
                                  & np.tril(np.ones((16, 16), bool)))


def test_recall_view_counts_key_or_value_in_view():
    cfg = dataclasses.replace(lm.Config(), num_pairs=2, num_queries=2)
    tokens = np.array([5, 40, 7, 41, 0, 0, 7, 41, 5, 40])
    weights = np.zeros(10)
    weights[[6, 8]] = 1
    m = np.zeros((10, 10))
    m[6, 3] = 1.0   # query of key 7 sees the value after its pair's key
    assert lm.recall_view(cfg, tokens, weights, m) == 0.5
    m[8, 0] = 0.5   # query of key 5 sees its pair's key through a summary
    assert lm.recall_view(cfg, tokens, weights, m) == 1.0
