"""examples/lm and its command line examples/train_lm.py: the train step learns, selectors get
their aux gradient, a sharded step equals the single-device step, checkpoints resume exactly, bad
flags fail with a clear message, and both ways of running the script work."""

from __future__ import annotations

import dataclasses
import json
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples import lm  # noqa: E402
from examples.train_lm import main  # noqa: E402

TINY = lm.Config(dim=32, depth=1, heads=4, kv_heads=2, seq_len=32, num_pairs=4, num_queries=4,
                 num_keys=8, num_values=8, batch_size=8, block_size=8, window=8,
                 compression_rate=4, index_dim=8, steps=8, warmup=1, lr=1e-2, eval_batches=2,
                 eval_every=1000, progress=False, impl="reference")
# impl="reference": every impl computes the same numbers (tests/test_block_sparse_*); the masked
# dense one compiles fastest, and this file is about the training loop around the modules.


def _one_device_mesh():
    return lm.make_mesh({"data": 1, "model": 1}, jax.devices()[:1])


@pytest.mark.parametrize("attn", ["standard", "deepseek_sparse"])
def test_train_steps_lower_the_loss(attn):
    cfg = dataclasses.replace(TINY, attn=attn)
    trainer = lm.Trainer.build(cfg, _one_device_mesh())
    data = lm.Data(cfg, trainer)
    evals = data.eval_batches()
    state = trainer.init_state()
    before = trainer.evaluate(state["params"], evals)["loss"]
    losses = []
    for step in range(cfg.steps):
        state, m = trainer.train_step(state, data.train_batch(step))
        losses.append(float(m["loss"]))
    after = trainer.evaluate(state["params"], evals)["loss"]
    assert np.all(np.isfinite(losses))
    assert after < 0.85 * before, (before, after, losses)
    assert int(state["step"]) == cfg.steps


INDEX_PARAMS = {
    "minimax_sparse": ("idx_q", "idx_k", "idx_q_norm", "idx_k_norm"),
    "deepseek_sparse": ("indexer",),
    "compressed_sparse": ("idx_q", "idx_k", "idx_w"),
}


def _index_grads(attn):
    """Gradients of task + c * aux for c = 0 and c = 1, and the aux value (one compile)."""
    cfg = dataclasses.replace(TINY, attn=attn)
    model = lm.LM(cfg)
    batch = lm.recall_batch(jax.random.key(0), cfg, 4)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), batch["tokens"])["params"])

    @jax.jit
    def grads(p, c):
        def total(q):
            logits, aux = model.apply({"params": q}, batch["tokens"], with_aux=True)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
            task = (ce * batch["weights"]).sum() / batch["weights"].sum()
            return task + c * aux, aux
        return jax.grad(total, has_aux=True)(p)

    (g_task, aux), (g_both, _) = grads(params, 0.0), grads(params, 1.0)
    return g_task, g_both, aux


@pytest.mark.parametrize("attn", list(INDEX_PARAMS))
def test_selectors_learn_only_through_the_aux_loss(attn):
    """Hard top-k gives the index branch no gradient from the task; the aux loss gives it one."""
    g_task, g_both, aux = _index_grads(attn)
    assert np.isfinite(float(aux)) and float(aux) > 0, aux
    t_attn, b_attn = g_task["block_0"]["attn"], g_both["block_0"]["attn"]
    for name in INDEX_PARAMS[attn]:
        assert name in t_attn, sorted(t_attn)
        assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(t_attn[name])), name
        assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(b_attn[name])), name
    # the main branch does learn from the task
    assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(t_attn["proj"]))


SHARDED = textwrap.dedent("""
    import dataclasses, json, sys
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    from jax.sharding import PartitionSpec as P
    from examples import lm
    assert jax.device_count() == 8, jax.devices()
    base = lm.Config(**json.loads(sys.argv[1]))
    report = {}
    for attn in ("gqa",):
        cfg = dataclasses.replace(base, attn=attn)
        runs = {}
        for name, mesh in (("one", lm.make_mesh({"data": 1, "model": 1}, jax.devices()[:1])),
                           ("eight", lm.make_mesh(lm.parse_mesh("data=4,model=2", 8)))):
            tr = lm.Trainer.build(cfg, mesh)
            data = lm.Data(cfg, tr)
            state = tr.init_state()
            losses = []
            for s in range(3):
                state, m = tr.train_step(state, data.train_batch(s))
                losses.append(float(m["loss"]))
            runs[name] = (losses, state, tr)
        (l1, s1, _), (l8, s8, tr8) = runs["one"], runs["eight"]
        np.testing.assert_allclose(l8, l1, rtol=2e-5, atol=1e-6)
        flat1 = jax.tree_util.tree_leaves_with_path(s1["params"])
        flat8 = dict(jax.tree_util.tree_leaves_with_path(s8["params"]))
        for path, a in flat1:
            np.testing.assert_allclose(np.asarray(flat8[path]), np.asarray(a), rtol=2e-4,
                                       atol=2e-6, err_msg=jax.tree_util.keystr(path))
        specs = {jax.tree_util.keystr(p): (tuple(x.sharding.spec), x.shape,
                                           x.addressable_shards[0].data.shape)
                 for p, x in jax.tree_util.tree_leaves_with_path(s8["params"])}
        mu = {jax.tree_util.keystr(p): tuple(x.sharding.spec)
              for p, x in jax.tree_util.tree_leaves_with_path(s8["opt_state"])}
        report[attn] = {"losses": l8, "specs": specs, "mu": mu,
                        "replicated": tr8.replicated_params}
    try:
        lm.Trainer.build(dataclasses.replace(base, batch_size=6), lm.make_mesh({"data": 4, "model": 2}))
        report["batch_error"] = "none raised"
    except ValueError as e:
        report["batch_error"] = str(e)
    print("REPORT" + json.dumps(report))
""")


def _spec(specs, path):
    spec, shape, shard = specs[path]
    return tuple(spec) + (None,) * (len(shape) - len(spec)), tuple(shape), tuple(shard)


def test_sharded_step_matches_single_device_on_eight_cpus():
    cfg = dataclasses.replace(TINY, batch_size=8)
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    # the session's XLA_FLAGS (conftest.py's optimisation level) plus eight host devices
    flags = os.environ.get("XLA_FLAGS", "").split() + ["--xla_force_host_platform_device_count=8"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))
    out = subprocess.run([sys.executable, "-c", SHARDED, json.dumps(fields)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.split("REPORT", 1)[1])

    gqa = report["gqa"]["specs"]
    # rules: heads / kv heads / mlp / vocab on "model", embed replicated; shards really are halves
    for path, want in [("['block_0']['attn']['q']['kernel']", (None, "model")),
                       ("['block_0']['attn']['k']['kernel']", (None, "model")),
                       ("['block_0']['attn']['proj']['kernel']", ("model", None)),
                       ("['block_0']['fc']['kernel']", (None, "model")),
                       ("['block_0']['fc']['bias']", ("model",)),
                       ("['block_0']['proj']['kernel']", ("model", None)),
                       ("['block_0']['proj']['bias']", (None,)),
                       ("['embed']['embedding']", ("model", None)),
                       ("['block_0']['ln_attn']['scale']", (None,)),
                       ("['pos_embed']", (None, None))]:
        spec, shape, shard = _spec(gqa, path)
        assert spec == want, (path, spec)
        assert shard == tuple(n // 2 if s == "model" else n for s, n in zip(spec, shape, strict=True)), path
    assert "batch_size=6 must be divisible by the mesh's data=4" in report["batch_error"]
    # the Adam moments live where their parameter lives
    mu = report["gqa"]["mu"]
    assert any("'q'" in k and "'kernel'" in k and v == [None, "model"] for k, v in mu.items())
    assert report["gqa"]["replicated"] == []


def _specs(cfg, mesh_shape):
    model = lm.LM(cfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                              jnp.zeros((1, cfg.seq_len), jnp.int32))["params"])
    specs, fallback = lm.param_partition_specs(boxed, mesh_shape)
    flat = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
    return {jax.tree_util.keystr(p): tuple(s) for p, s in flat}, fallback


def test_rules_place_every_mechanisms_parameters():
    mesh = {"data": 4, "model": 2}
    msa, fb = _specs(dataclasses.replace(TINY, attn="minimax_sparse"), mesh)
    assert fb == []
    assert msa["['block_0']['attn']['idx_q']['kernel']"] == (None, "model")  # kv groups
    assert msa["['block_0']['attn']['idx_k']['kernel']"] == (None, None)  # "index": replicated
    assert msa["['block_0']['attn']['q_norm']"] == (None,)
    csa, _ = _specs(dataclasses.replace(TINY, attn="compressed_sparse"), mesh)
    assert csa["['block_0']['attn']['idx_w']['kernel']"] == (None, "model")  # index heads
    assert csa["['block_0']['attn']['sink']"] == ("model",)
    assert csa["['block_0']['attn']['proj']['w']"] == ("model", None, None)
    # a dimension the mesh axis does not divide is replicated, and reported
    odd, fb = _specs(dataclasses.replace(TINY, attn="mqa"), {"data": 1, "model": 3})
    assert odd["['block_0']['attn']['kv']['kernel']"] == (None, None)
    assert any("['block_0']['attn']['kv']['kernel'] dim 1 (16 % model=3)" in f for f in fb), fb


def test_checkpoint_resume_reproduces_the_uninterrupted_run(tmp_path):
    cfg = dataclasses.replace(TINY, eval_every=3)
    straight = lm.train(cfg, _one_device_mesh(), log=lambda s: None)

    ckpt = dataclasses.replace(cfg, ckpt_dir=str(tmp_path / "ckpt"), ckpt_every=2)
    first = lm.train(ckpt, _one_device_mesh(), log=lambda s: None, stop_after=5)
    assert int(first["state"]["step"]) == 5
    logs: list[str] = []
    resumed = lm.train(ckpt, _one_device_mesh(), log=logs.append)
    assert any("resumed" in s and "step 5" in s for s in logs), logs

    a, b = straight["state"], resumed["state"]
    assert int(b["step"]) == 8
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert resumed["train_loss"] == straight["train_loss"]
    assert resumed["final_loss"] == straight["final_loss"]
    assert resumed["initial_loss"] == straight["initial_loss"]

    for change in (dict(lr=1e-3), dict(dim=64)):  # same shapes / other shapes
        with pytest.raises(ValueError, match=f"{next(iter(change))}: checkpoint"):
            lm.train(dataclasses.replace(ckpt, **change), _one_device_mesh(), log=lambda s: None)


def test_cli_writes_metrics(tmp_path, capsys):
    out = tmp_path / "m.json"
    args = ["--attn", "standard", "--dim", "32", "--depth", "1", "--seq-len", "32",
            "--num-pairs", "4", "--num-queries", "4", "--num-keys", "8", "--num-values", "8",
            "--batch-size", "8", "--block-size", "8", "--window", "8", "--index-dim", "8",
            "--impl", "reference",
            "--steps", "8", "--warmup", "1", "--lr", "1e-2", "--eval-every", "4",
            "--eval-batches", "1", "--metrics-out", str(out), "--no-progress", "--show"]
    main(args)
    m = json.loads(out.read_text())
    for key in ("initial_loss", "final_loss", "steps", "devices", "tokens_per_sec"):
        assert key in m, key
    assert m["steps"] == 8 and m["devices"] == jax.device_count() == 1
    assert m["final_loss"] < m["initial_loss"]
    assert m["tokens_per_sec"] > 0
    assert [e["step"] for e in m["evals"]] == [0, 4, 8]
    assert len(m["train_loss"]) == 8
    printed = capsys.readouterr().out
    assert "pairs" in printed and "queries" in printed


def test_recall_batch_layout():
    cfg = TINY
    b = jax.device_get(jax.jit(lm.recall_batch, static_argnums=(1, 2))(jax.random.key(3), cfg, 16))
    tok, tgt, w = b["tokens"], b["targets"], b["weights"]
    np.testing.assert_array_equal(tgt[:, :-1], tok[:, 1:])
    assert np.all(w.sum(1) == cfg.num_queries)
    for row in range(16):
        pairs = dict(zip(tok[row, 0:2 * cfg.num_pairs:2], tok[row, 1:2 * cfg.num_pairs:2],
                         strict=True))
        assert len(pairs) == cfg.num_pairs  # distinct keys
        for p in np.flatnonzero(w[row]):
            assert p >= 2 * cfg.num_pairs and tgt[row, p] == pairs[tok[row, p]]


def test_text_file_task(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 40)
    cfg = dataclasses.replace(TINY, text=str(path), steps=3)
    result = lm.train(cfg, _one_device_mesh(), log=lambda s: None)
    assert result["task"] == "text" and cfg.vocab == 256
    assert result["final_loss"] < result["initial_loss"]


@pytest.mark.parametrize("spec, message", [
    ("data=2", "multiply to 2, but there are 1 devices"),
    ("data=1,pipe=1", "unknown axis 'pipe'"),
    ("data=1,data=1", "given twice"),
    ("data", "not AXIS=SIZE"),
    ("data=0", "must be >= 1"),
])
def test_bad_mesh_is_named(spec, message):
    with pytest.raises(ValueError, match=message):
        lm.parse_mesh(spec, 1)
    with pytest.raises(ValueError, match=message):
        main(["--mesh", spec, "--steps", "1", "--no-progress"])


def test_mesh_default_and_valid_spec():
    assert lm.parse_mesh(None, 8) == {"data": 8, "model": 1}
    assert lm.parse_mesh("model=2,data=4", 8) == {"data": 4, "model": 2}
    assert lm.parse_mesh("model=8", 8) == {"data": 1, "model": 8}


def test_unknown_attn_and_bad_sizes_are_named():
    with pytest.raises(ValueError, match="'flash'.*standard, gqa"):
        main(["--attn", "flash"])
    with pytest.raises(ValueError, match="dim=30 must be divisible by heads=4"):
        main(["--dim", "30"])
    with pytest.raises(ValueError, match="num_queries=9"):
        main(["--num-queries", "9"])


def test_every_mechanism_is_built_causal():
    for attn in lm.MECHANISMS:
        module = lm.make_attention(dataclasses.replace(TINY, attn=attn), 0)
        assert getattr(module, "causal", True) is True, attn  # no field: always causal


def test_lm_is_causal():
    """Changing a later token never changes earlier logits (BigBird's causal flag is not its
    default, and its block pattern is the least obvious one)."""
    cfg = dataclasses.replace(TINY, attn="bigbird")
    model = lm.LM(cfg)
    tokens = lm.recall_batch(jax.random.key(0), cfg, 1)["tokens"]
    variables = jax.jit(model.init)(jax.random.key(1), tokens)
    fwd = jax.jit(lambda v, t: model.apply(v, t)[0])
    a = fwd(variables, tokens)
    b = fwd(variables, tokens.at[:, 20].set((tokens[:, 20] + 1) % cfg.vocab))
    np.testing.assert_array_equal(np.asarray(a[:, :20]), np.asarray(b[:, :20]))
    assert not np.allclose(np.asarray(a[:, 20:]), np.asarray(b[:, 20:]))


def test_script_runs_as_a_file_and_as_a_module(monkeypatch, capsys):
    """``python examples/train_lm.py`` (a fresh process that has only examples/ on its path)
    and ``python -m examples.train_lm`` (run here the way ``-m`` runs it) take the same flags."""
    env = dict(os.environ, PYTHONPATH="")  # the script finds the package on its own
    as_file = subprocess.run([sys.executable, "examples/train_lm.py", "--help"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=120)
    assert as_file.returncode == 0, as_file.stderr[-2000:]
    monkeypatch.setattr(sys, "argv", ["train_lm.py", "--help"])
    monkeypatch.delitem(sys.modules, "examples.train_lm")  # run it fresh, as -m does
    with pytest.raises(SystemExit) as done:
        runpy.run_module("examples.train_lm", run_name="__main__", alter_sys=True)
    assert done.value.code == 0
    as_module = capsys.readouterr().out
    for out in (as_file.stdout, as_module):
        assert "--attn" in out and "--ckpt-dir" in out and "--mesh" in out, out
    assert as_file.stdout.split("options:")[1] == as_module.split("options:")[1]
