"""from_torch / to_torch: exact round trips, strict key and shape checks, safe file loading."""

from __future__ import annotations

import pickle

import attnhut
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import attnhut_jax as ah
from parity import (
    from_state_dict,
    from_torch,
    load_state_dict,
    load_variables,
    save_state_dict,
    to_state_dict,
    to_torch,
)

TORCH_MODULES = [
    lambda: attnhut.StandardAttention(32, 4, causal=True, dropout=0.1, bias=True),
    lambda: attnhut.MultiQueryAttention(32, 4, bias=True),
    lambda: attnhut.GroupedQueryAttention(32, 8, 2, causal=True),
    lambda: attnhut.MultiHeadLatentAttention(48, 4, 20, 10, 4, 6, 10, causal=False,
                                             rope_theta=123.0),
    lambda: attnhut.DifferentialAttention(32, 2, depth=4, causal=False, bias=True),
    lambda: attnhut.SlotAttention(16, 5, num_iters=2, hidden_dim=40, eps=1e-7),
]


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("make", TORCH_MODULES)
def test_round_trip_is_exact(make):
    torch.manual_seed(0)
    tm = make()
    fm, v = from_torch(tm)
    back = to_torch(fm, v)
    assert type(back) is type(tm)
    _same_state(tm, back)
    for attr in ("num_heads", "causal", "dropout", "num_kv_heads", "lambda_init", "num_slots",
                 "num_iters", "eps", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim",
                 "v_head_dim", "rope_theta"):
        if hasattr(tm, attr):
            assert getattr(back, attr) == getattr(tm, attr), attr
    fm2, v2 = from_torch(back)
    assert fm2 == fm
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), nn.unbox(v),
                           nn.unbox(v2))


@pytest.mark.parametrize("make", TORCH_MODULES)
def test_converted_variables_have_init_structure(make):
    torch.manual_seed(0)
    fm, v = from_torch(make())
    x = jnp.zeros((1, 2, fm.dim))
    # init's structure, shapes and dtypes (the values do not matter here: no need to compute them)
    init = jax.eval_shape(fm.init, {"params": jax.random.key(0), "slots": jax.random.key(0)}, x)
    shapes = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), init)
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), v) == shapes
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(init)


def test_flax_init_round_trips_through_torch():
    fm = ah.GroupedQueryAttention(32, 4, 2, bias=True)
    v = fm.init(jax.random.key(3), jnp.zeros((1, 2, 32)))
    tm = to_torch(fm, v)
    x = np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32)
    with torch.no_grad():
        ref = tm.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(fm.apply(v, jnp.asarray(x))), ref, atol=1e-5)


class NotAttention(torch.nn.Module):
    pass


def test_unknown_torch_module_is_a_type_error():
    with pytest.raises(TypeError, match=r"no converter for .*NotAttention"):
        from_torch(NotAttention())
    with pytest.raises(TypeError, match=r"no converter for .*Linear"):
        from_torch(torch.nn.Linear(3, 3))


def test_unknown_flax_module_is_a_type_error():
    with pytest.raises(TypeError, match=r"no converter for .*Dense"):
        to_torch(nn.Dense(3), {})


def test_missing_extra_and_misshaped_keys_are_named():
    torch.manual_seed(0)
    tm = attnhut.GroupedQueryAttention(32, 4, 2)
    fm, _ = from_torch(tm)
    sd = dict(tm.state_dict())
    missing = {k: v for k, v in sd.items() if k != "k.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['k.weight'\], unexpected keys \[\]"):
        from_state_dict(fm, missing)
    extra = {**sd, "k.bias": torch.zeros(16)}
    with pytest.raises(ValueError, match=r"unexpected keys \['k.bias'\]"):
        from_state_dict(fm, extra)
    bad = {**sd, "v.weight": torch.zeros(16, 31)}
    with pytest.raises(ValueError, match=r"state_dict\['v.weight'\] has shape \(16, 31\), "
                                         r"expected \(16, 32\)"):
        from_state_dict(fm, bad)
    # a state dict for another configuration is refused, not silently reshaped
    with pytest.raises(ValueError, match="state_dict"):
        from_state_dict(ah.GroupedQueryAttention(32, 4, 1), sd)


def test_state_dict_names_mirror_attnhut():
    torch.manual_seed(0)
    for make in TORCH_MODULES:
        tm = make()
        fm, v = from_torch(tm)
        assert set(to_state_dict(fm, v)) == set(tm.state_dict())


def test_files_load_without_unpickling(tmp_path):
    torch.manual_seed(0)
    tm = attnhut.MultiHeadLatentAttention(32, 4)
    fm, v = from_torch(tm)
    pt = tmp_path / "mla.pt"
    torch.save(tm.state_dict(), pt)
    v_pt = load_variables(fm, pt)
    st = tmp_path / "mla.safetensors"
    save_state_dict(fm, v, st)
    v_st = load_variables(fm, st)
    for got in (v_pt, v_st):
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b),
                               nn.unbox(got), nn.unbox(v))
    # attnhut reads what we wrote
    tm2 = attnhut.MultiHeadLatentAttention(32, 4)
    from safetensors.torch import load_file

    tm2.load_state_dict(load_file(str(st)))
    _same_state(tm, tm2)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"q_down.weight": torch.zeros(1), "x": Evil()}, evil)
    with pytest.raises(pickle.UnpicklingError):
        load_state_dict(evil)


def test_to_torch_refuses_options_attnhut_lacks():
    """An option attnhut's layer does not have is refused by name, never dropped."""
    from parity import to_torch

    for m, match in [(ah.GroupedQueryAttention(16, 4, 2, causal=True, rope_theta=1e4, window=4),
                      r"has no rope_theta=10000.0, window=4"),
                     (ah.MultiHeadLatentAttention(16, 4, q_lora_rank=None),
                      r"has no full-rank query"),
                     (ah.MultiHeadLatentAttention(16, 4, rope_style="interleaved"),
                      r"has no rope_style='interleaved'")]:
        v = m.init(jax.random.key(0), jnp.zeros((1, 3, 16)))
        with pytest.raises(ValueError, match=match):
            to_torch(m, v)
