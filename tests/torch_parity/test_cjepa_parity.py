"""CausalJEPA against attnhut 0.5.0: forward, gradients, predict, loss, conversion both ways."""

from __future__ import annotations

import attnhut
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from attnhut.cjepa import cjepa_masked_loss as torch_loss

import attnhut_jax as ah
from parity import from_torch, to_torch
from parity.compare import Case, run_case
from parity.convert import abstract_variables


class _TorchPredict(attnhut.CausalJEPAAttention):
    """attnhut's module whose forward is ``predict``, so that the harness can compare it."""

    def forward(self, slots):
        return self.predict(slots)


_TorchPredict.__name__ = "CausalJEPAAttention"  # the converter looks modules up by class name


def _cjepa(config, shape, mask_slots, **kw) -> Case:
    ms = np.asarray(mask_slots)
    ms = ms.astype(np.int64) if ms.dtype != np.bool_ else ms

    def call(rng, tm):
        return {"mask_slots": torch.from_numpy(ms)}, {"mask_slots": jnp.asarray(ms)}

    d, h, s, hist = kw.pop("dim", 16), kw.pop("num_heads", 2), shape[2], kw.pop("history_frames")
    return Case("CausalJEPAAttention", config,
                lambda: attnhut.CausalJEPAAttention(d, h, s, hist, **kw),
                shape, call=call, output=lambda o: o[0])


def _predict(config, shape, **kw) -> Case:
    d, h, s, hist = kw.pop("dim", 16), kw.pop("num_heads", 2), shape[2], kw.pop("history_frames")
    return Case("CausalJEPAAttention", config, lambda: _TorchPredict(d, h, s, hist, **kw), shape,
                call=lambda rng, tm: ({}, {"method": "predict"}))


PARITY = [  # most rows share B=2, F=4, S=3, D=16 so that eager op compilations are reused
    _cjepa("depth1 hist1 pred3 mask[0]", (2, 1, 3, 16), [0], history_frames=1, pred_frames=3,
           depth=1),
    _cjepa("depth2 h4 hist2 pred2 mask[2,0] nobias mlp40", (2, 2, 3, 16), [2, 0], num_heads=4,
           history_frames=2, pred_frames=2, depth=2, mlp_dim=40, bias=False),
    _cjepa("depth1 hist4 pred0 mask[1]", (2, 4, 3, 16), [1], history_frames=4, pred_frames=0,
           num_masked_slots=1, depth=1),
    _cjepa("depth2 hist3 all objects masked", (2, 3, 3, 16), [0, 1, 2], history_frames=3,
           num_masked_slots=3, depth=2),
    _cjepa("depth1 hist3 none masked", (2, 3, 3, 16), np.zeros(0, np.int64), history_frames=3,
           num_masked_slots=0, depth=1),
    _cjepa("depth1 hist3 mask[-1,1,1] (negative, repeat)", (2, 3, 3, 16), [-1, 1, 1],
           history_frames=3, depth=1),
    _cjepa("depth1 hist3 boolean mask", (2, 3, 3, 16), [True, False, True], history_frames=3,
           depth=1),
    _cjepa("depth1 hist3 scalar mask 2", (2, 3, 3, 16), 2, history_frames=3, depth=1),
    _cjepa("depth1 short history t=2 of 3", (2, 2, 3, 16), [1], history_frames=3, depth=1),
    _cjepa("depth0 dim30 h4 (no attention)", (2, 2, 3, 30), [0], dim=30, num_heads=4,
           history_frames=2, depth=0),
    _predict("predict depth2 hist3 pred1", (2, 3, 3, 16), history_frames=3, depth=2),
    _predict("predict depth1 short history t=1 of 3", (2, 1, 3, 16), history_frames=3, depth=1,
             bias=False),
]


@pytest.mark.parametrize("case", PARITY, ids=[c.config for c in PARITY])
def test_forward_and_gradients_match_attnhut(case: Case):
    r = run_case(case)
    assert r.ok, f"out {r.out_err:.2e}, grads {r.grad_errs}"
    # the input and every parameter were compared
    torch.manual_seed(0)
    assert set(r.grad_errs) == {"input", *case.make().state_dict()}


@pytest.mark.parametrize("mask_slots,hist,pred_frames", [
    ([1], 3, 2), ([0, 2, 1], 3, 1), ([], 2, 2), ([-1, 0, 0], 4, 0), ([True, False, False], 2, 1),
    ([], 2, 0),  # nothing is scored: NaN with zero gradients on both sides
])
def test_loss_matches_attnhut(mask_slots, hist, pred_frames):
    rng = np.random.default_rng(0)
    shape = (2, hist + pred_frames, 3, 5)
    p_np, t_np = (rng.standard_normal(shape, dtype=np.float32) for _ in range(2))
    ms = np.asarray(mask_slots)
    ms = ms.astype(np.int64) if ms.dtype != np.bool_ else ms
    p_t, t_t = (torch.from_numpy(a).requires_grad_(True) for a in (p_np, t_np))
    ref = torch_loss(p_t, t_t, torch.from_numpy(ms), hist)
    ref.backward()
    got, (gp, gt) = jax.value_and_grad(ah.cjepa_masked_loss, argnums=(0, 1))(
        jnp.asarray(p_np), jnp.asarray(t_np), jnp.asarray(ms), hist)
    np.testing.assert_allclose(float(got), float(ref.detach()), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(gp), p_t.grad.numpy(), atol=1e-7)
    np.testing.assert_allclose(np.asarray(gt), t_t.grad.numpy(), atol=1e-7)


@pytest.mark.parametrize("make", [
    lambda: attnhut.CausalJEPAAttention(16, 2, 3, 3, pred_frames=2, num_masked_slots=1, depth=2,
                                        mlp_dim=24, dropout=0.1, bias=False),
    lambda: attnhut.CausalJEPAAttention(30, 4, 3, 2, pred_frames=0, depth=0),
])
def test_conversion_round_trips_exactly(make):
    torch.manual_seed(0)
    tm = make()
    fm, v = from_torch(tm)
    back = to_torch(fm, v)
    sa, sb = tm.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    fm2, v2 = from_torch(back)
    assert fm2 == fm
    jax.tree_util.tree_map(np.testing.assert_array_equal, nn.unbox(v), nn.unbox(v2))
    shapes = jax.tree_util.tree_map(lambda a: a.shape, abstract_variables(fm))
    assert jax.tree_util.tree_map(lambda a: a.shape, v) == shapes


def test_flax_init_runs_in_torch():
    fm = ah.CausalJEPAAttention(16, 2, 3, 3, depth=1)
    x = jax.random.normal(jax.random.key(0), (2, 3, 3, 16))
    v = fm.init({"params": jax.random.key(1), "mask": jax.random.key(2)}, x)
    tm = to_torch(fm, v).eval()
    with torch.no_grad():
        ref = tm.predict(torch.from_numpy(np.array(x))).numpy()
    np.testing.assert_allclose(np.asarray(fm.apply(v, x, method="predict")), ref, atol=1e-5)

