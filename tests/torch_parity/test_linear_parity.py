"""The linear-attention modules against their torch originals (float32, CPU).

- ``GatedDeltaNet`` ("mamba" gate) against transformers' ``Qwen3_5GatedDeltaNet`` with grouped
  value heads (more value heads than query/key heads), and against ``Qwen3NextGatedDeltaNet``
  (the same layer with fused, per-key-head-grouped projections: only the weight layout differs);
  ``GatedDeltaNet`` ("logsigmoid" gate) against ``parity.oracles.GatedDeltaNet``.
- ``KimiDeltaAttention`` against transformers' ``KimiLinearDeltaAttention``, its forget gate's
  ``A_log`` / ``dt_bias`` (``torch.empty`` in the constructor) initialised as
  ``KimiLinearPreTrainedModel._init_weights`` does.
- ``LinearAttention`` (causal and not) against ``parity.oracles.LinearAttention``.

transformers runs its pure-torch paths here (no flash-linear-attention, triton, causal-conv1d or
``kernels`` in this environment): ``test_transformers_runs_its_torch_fallbacks`` asserts it.

The HF layers read an initial recurrent state from a cache: a real ``transformers.Cache`` of one
``LinearAttentionLayer`` holds it (zero conv tail, so the conv starts from zeros as ours does), and
the final state is read back from it (``parity.cases.hf_cache``). Its layer keeps the new state by
reference instead of ``copy_``-ing it into the initial one (the stock in-place copy overwrites a
tensor autograd saved, so no backward could run through a cached initial state); the stock layer
gives the same forward (``test_logsigmoid_oracle_matches_qwen35_with_the_mamba_gate`` uses it).

Batch 2, T = 13 (the chunked forms use chunk 8: not a multiple; HF's torch chunk form pads to 64),
every impl of ``gated_delta`` that exists (an impl whose op raises ``NotImplementedError`` is
skipped). Outputs and the final state: max |d| <= 1e-5 max(1, max |ref|); gradients of the input,
of every parameter and of the initial state: max |d| <= 1e-4 max(1, max |ref|).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.kimi_linear import modeling_kimi_linear as kimi
from transformers.models.qwen3_5 import modeling_qwen3_5 as qwen35
from transformers.models.qwen3_next import modeling_qwen3_next as qwen3n

import attnhut_jax as ah
from attnhut_jax import core
from parity import from_torch, oracles, to_state_dict, to_torch
from parity.cases import hf_cache, kimi_delta, logsigmoid_gdn, qwen_gdn
from parity.convert import abstract_variables, qwen_text_config

B, T, D = 2, 13, 16
CHUNK = 8
IMPLS = ("recurrent", "chunk", "pallas")
OUT_TOL, GRAD_TOL = 1e-5, 1e-4


# ----------------------------------------------------------------------------- torch layers


def _gdn_shape():
    """A Qwen3.5-like GDN, tiny: 2 query/key heads of 8, 4 value heads of 6 (grouped values)."""
    return ah.GatedDeltaNet(D, 2, 4, 8, 6, conv_size=4)


def make_qwen35():
    return qwen_gdn("Qwen3_5GatedDeltaNet")


def make_qwen3next():
    return qwen_gdn("Qwen3NextGatedDeltaNet")


def make_logsigmoid():
    """d9d's gate as it defines it, g = log_sigmoid(a) (gate_normalizer 1)."""
    return logsigmoid_gdn(1.0)


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str
    make: Callable[[], torch.nn.Module]
    hf: bool  # reads its initial state from a transformers cache
    stateful: bool = True  # has a recurrent state (initial_state / return_state)


LAYERS = [
    Layer("gdn-qwen3.5-gva", make_qwen35, hf=True),
    Layer("gdn-logsigmoid", make_logsigmoid, hf=False),
    Layer("kda-kimi", kimi_delta, hf=True),
    Layer("linear-causal", lambda: oracles.LinearAttention(D, 2, causal=True, bias=True),
          hf=False),
    Layer("linear-bidir", lambda: oracles.LinearAttention(D, 2, causal=False), hf=False,
          stateful=False),
]
# the same computation as gdn-qwen3.5-gva, another weight layout: one comparison
NEXT = Layer("gdn-qwen3-next", make_qwen3next, hf=True)
BY_NAME = {c.name: c for c in [*LAYERS, NEXT]}


# ----------------------------------------------------------------------------- the torch side


def run_torch(layer: torch.nn.Module, hf: bool, x: torch.Tensor, s0: torch.Tensor | None):
    """(out, final state or None)."""
    if hf:
        if s0 is None:
            return layer(x), None
        cache = hf_cache(layer, s0)
        out = layer(x, cache=cache)
        return out, cache.layers[0].final_state
    if s0 is None and not getattr(layer, "causal", True):
        return layer(x), None
    return layer(x, initial_state=s0, return_state=True)


def _state_shape(fm: nn.Module) -> tuple[int, ...]:
    return fm.state_shape(B)


@functools.cache
def torch_reference(name: str, with_state: bool):
    """Everything the torch side computes for one layer: the layer, input, cotangents, outputs
    and gradients (numpy), computed once for every impl."""
    spec = BY_NAME[name]
    torch.manual_seed(0)
    layer = spec.make().float()
    fm, variables = from_torch(layer)
    rng = np.random.default_rng(1)
    x_np = rng.standard_normal((B, T, D), dtype=np.float32)
    s0_np = (0.5 * rng.standard_normal(_state_shape(fm), dtype=np.float32)
             if with_state else None)
    x = torch.from_numpy(x_np).requires_grad_(True)
    s0 = None if s0_np is None else torch.from_numpy(s0_np.copy()).requires_grad_(True)
    out, state = run_torch(layer, spec.hf, x, s0)
    gout = rng.standard_normal(tuple(out.shape), dtype=np.float32)
    loss = (out * torch.from_numpy(gout)).sum()
    gstate = None
    if state is not None:
        gstate = rng.standard_normal(tuple(state.shape), dtype=np.float32)
        loss = loss + (state * torch.from_numpy(gstate)).sum()
    loss.backward()
    grads = {"input": x.grad.numpy()}
    if s0 is not None:
        grads["initial_state"] = s0.grad.numpy()
    for pname, p in layer.named_parameters():
        assert p.grad is not None, pname
        grads[pname] = p.grad.numpy()
    return dict(layer=layer, fm=fm, params=nn.unbox(variables)["params"], x=x_np, s0=s0_np,
                gout=gout, gstate=gstate, out=out.detach().numpy(),
                state=None if state is None else state.detach().numpy(), grads=grads)


# ----------------------------------------------------------------------------- the jax side


@functools.cache
def impl_exists(impl: str) -> bool:
    """Whether the ``gated_delta`` op has ``impl`` (False when it raises NotImplementedError)."""
    z = jnp.zeros((1, 2, 1, 2), jnp.float32)
    try:
        core.gated_delta_rule(z, z, z, jnp.zeros((1, 2, 1)), jnp.ones((1, 2, 1)), impl=impl,
                              chunk_size=CHUNK, owner="probe")
    except NotImplementedError:
        return False
    return True


def _close(got: np.ndarray, ref: np.ndarray, tol: float) -> tuple[bool, float]:
    err = float(np.max(np.abs(got - ref), initial=0.0)) if got.shape == ref.shape else np.inf
    return err <= tol * max(1.0, float(np.max(np.abs(ref), initial=0.0))), err


def run_jax(ref: dict, impl: str):
    fm = ref["fm"].clone(impl=impl, chunk_size=CHUNK)
    stateful = ref["state"] is not None

    def f(p, x, s0):
        kw = dict(initial_state=s0, return_state=True) if stateful else {}
        return fm.apply({"params": p}, x, **kw)

    s0 = None if ref["s0"] is None else jnp.asarray(ref["s0"])
    cot = (jnp.asarray(ref["gout"]), jnp.asarray(ref["gstate"])) if stateful else \
        jnp.asarray(ref["gout"])

    @jax.jit
    def fwd_bwd(p, x, s0):
        out, vjp = jax.vjp(f, p, x, s0)
        return out, vjp(cot)

    out, (gp, gx, gs) = fwd_bwd(ref["params"], jnp.asarray(ref["x"]), s0)
    grads = {"input": np.asarray(gx),
             **to_state_dict(fm, {"params": gp}, type(ref["layer"]))}
    if gs is not None:
        grads["initial_state"] = np.asarray(gs)
    out, state = (out if stateful else (out, None))
    return fm, np.asarray(out), None if state is None else np.asarray(state), grads


def check(ref: dict, impl: str) -> None:
    if not impl_exists(impl):
        pytest.skip(f"gated_delta impl={impl!r} raises NotImplementedError here")
    _, out, state, grads = run_jax(ref, impl)
    ok, err = _close(out, ref["out"], OUT_TOL)
    assert ok, f"output max |d| = {err:.3e}"
    if ref["state"] is not None:
        ok, err = _close(state, ref["state"], OUT_TOL)
        assert ok, f"final state max |d| = {err:.3e}"
    assert set(grads) == set(ref["grads"]), (sorted(grads), sorted(ref["grads"]))
    bad = {}
    for k, want in ref["grads"].items():
        ok, err = _close(grads[k], want, GRAD_TOL)
        if not ok:
            bad[k] = err
    assert not bad, f"gradients out of tolerance: {bad}"


# ----------------------------------------------------------------------------- tests


def _matrix():
    """(layer, with_state, impl): every impl with an initial state; without one, every impl for
    the HF layers (their torch side then runs another path: no cache) and ``recurrent`` for the
    oracles (whose torch side is the same loop from zeros; the op's own tests prove None == zeros
    for every impl). Keeps the file near 30 s single core."""
    out = []
    for layer in LAYERS:
        if not layer.stateful:
            continue
        for impl in IMPLS:
            out.append(pytest.param(layer.name, True, impl,
                                    id=f"{layer.name}-initial-state-{impl}"))
            if layer.hf or impl == "recurrent":
                out.append(pytest.param(layer.name, False, impl,
                                        id=f"{layer.name}-zero-state-{impl}"))
    return out


@pytest.mark.parametrize("name, with_state, impl", _matrix())
def test_forward_and_gradients(name, with_state, impl):
    check(torch_reference(name, with_state), impl)


def test_bidirectional_linear_attention():
    """No recurrence (the impl is not used): one comparison."""
    check(torch_reference("linear-bidir", False), "recurrent")


def test_qwen3_next_layout():
    """Qwen3-Next's fused, per-key-head-grouped projections convert to the same module."""
    check(torch_reference(NEXT.name, True), "recurrent")


def test_logsigmoid_oracle_matches_qwen35_with_the_mamba_gate():
    """The oracle's shared parts (conv, norms, grouped heads, the recurrence) are Qwen3.5's: with
    the mamba gate and Qwen3.5's weights it computes what ``Qwen3_5GatedDeltaNet`` does."""
    torch.manual_seed(0)
    layer = make_qwen35()
    fm, v = from_torch(layer)
    oracle = to_torch(fm, v, oracles.GatedDeltaNet)
    assert oracle.decay_gate == "mamba"
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((B, T, D), dtype=np.float32))
    s0 = torch.from_numpy(rng.standard_normal(fm.state_shape(B), dtype=np.float32))
    with torch.no_grad():
        cache = hf_cache(layer, s0.clone(), replay=False)
        want, want_s = layer(x, cache=cache), cache.get_recurrent_state(0)
        got, got_s = oracle(x, initial_state=s0, return_state=True)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
    np.testing.assert_allclose(got_s.numpy(), want_s.numpy(), atol=1e-5)


def test_transformers_runs_its_torch_fallbacks(monkeypatch):
    """No fla / triton / causal-conv1d / kernels here, so every kernel hook of the three layers
    resolved to transformers' own torch function, and the layers call those hooks: parity never
    silently runs another path."""
    for package in ("fla", "triton", "causal_conv1d", "kernels"):
        assert importlib.util.find_spec(package) is None, f"{package} is installed"
    from transformers.integrations import hub_kernels

    assert not hub_kernels.is_kernels_available() and not hub_kernels._kernels_enabled
    hooks = [qwen35.torch_chunk_gated_delta_rule, qwen35.torch_recurrent_gated_delta_rule,
             qwen35.causal_conv1d_fn, qwen35.causal_conv1d_update,
             qwen3n.torch_chunk_gated_delta_rule, qwen3n.torch_recurrent_gated_delta_rule,
             kimi.chunk_kimi_delta_attention, kimi.recurrent_kimi_delta_attention,
             kimi.causal_conv1d_fn, kimi.causal_conv1d_update]
    for hook in hooks:
        bound = inspect.getclosurevars(hook).nonlocals
        assert bound["implementation"] is hook.__wrapped__, hook.__name__
        assert bound["is_new_implementation"] is False, hook.__name__
    # the layers' forwards go through those module-level hooks
    calls = []
    for module, names in ((qwen35, ("torch_chunk_gated_delta_rule", "causal_conv1d_fn")),
                          (kimi, ("chunk_kimi_delta_attention", "causal_conv1d_fn"))):
        for fn_name in names:
            real = getattr(module, fn_name)

            def counted(*args, _real=real, _name=fn_name, **kwargs):
                calls.append(_name)
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, fn_name, counted)
    x = torch.zeros(1, 3, D)
    with torch.no_grad():
        make_qwen35()(x)
        kimi_delta()(x)
    assert calls == ["causal_conv1d_fn", "torch_chunk_gated_delta_rule",
                     "causal_conv1d_fn", "chunk_kimi_delta_attention"], calls


# ----------------------------------------------------------------------------- conversion

ROUND_TRIP = {
    "qwen3.5": make_qwen35,
    "qwen3-next": make_qwen3next,
    "kimi": kimi_delta,
    "oracle-gdn-logsigmoid": lambda: oracles.GatedDeltaNet(D, 2, 2, 8, 8, decay_gate="logsigmoid"),
    "oracle-gdn-mamba-no-l2": lambda: oracles.GatedDeltaNet(D, 1, 2, 4, 8, decay_gate="mamba",
                                                            use_qk_l2norm=False, conv_size=3),
    "oracle-linear": lambda: oracles.LinearAttention(D, 4, causal=False, eps=1e-5, bias=True),
}


@pytest.mark.parametrize("make", list(ROUND_TRIP.values()), ids=list(ROUND_TRIP))
def test_round_trip_is_exact(make):
    torch.manual_seed(0)
    layer = make()
    fm, v = from_torch(layer)
    back = to_torch(fm, v, type(layer))
    assert type(back) is type(layer)
    sa, sb = layer.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert set(to_state_dict(fm, v, type(layer))) == set(sa)
    fm2, v2 = from_torch(back)
    assert fm2 == fm
    jax.tree_util.tree_map(np.testing.assert_array_equal, nn.unbox(v), nn.unbox(v2))


def test_to_torch_picks_the_layer_that_computes_the_module():
    cases = [
        (ah.GatedDeltaNet(D, 2, 4, 8, 6), qwen35.Qwen3_5GatedDeltaNet),
        (ah.GatedDeltaNet(D, 2, 4, 8, 6, decay_gate="logsigmoid"), oracles.GatedDeltaNet),
        (ah.GatedDeltaNet(D, 2, 4, 8, 6, use_qk_l2norm=False), oracles.GatedDeltaNet),
        (ah.KimiDeltaAttention(D, 2, 8), kimi.KimiLinearDeltaAttention),
        (ah.LinearAttention(D, 2), oracles.LinearAttention),
    ]
    def zeros(fm):  # the types are under test, not the values: no init to run
        return jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                                      nn.unbox(abstract_variables(fm)))

    for fm, cls in cases:
        assert type(to_torch(fm, zeros(fm))) is cls, fm
    fm = ah.GatedDeltaNet(D, 2, 4, 8, 6, decay_gate="logsigmoid")
    v = zeros(fm)
    with pytest.raises(ValueError, match="no torch layer .* Qwen3_5GatedDeltaNet"):
        to_torch(fm, v, qwen35.Qwen3_5GatedDeltaNet)
    with pytest.raises(ValueError, match="linear-attention modules only"):
        to_torch(ah.GroupedQueryAttention(32, 4, 2), zeros(ah.GroupedQueryAttention(32, 4, 2)),
                 qwen35.Qwen3_5GatedDeltaNet)


def test_flax_init_through_qwen3_next():
    """A Flax-initialised GDN written as Qwen3-Next's fused layout computes the same thing."""
    fm = ah.GatedDeltaNet(D, 2, 4, 8, 6, impl="recurrent")
    v = jax.jit(fm.init)(jax.random.key(3), jnp.zeros((1, 2, D)))
    layer = to_torch(fm, v, qwen3n.Qwen3NextGatedDeltaNet)
    x = np.random.default_rng(0).standard_normal((B, 5, D)).astype(np.float32)
    with torch.no_grad():
        want = layer(torch.from_numpy(x)).numpy()
    got = jax.jit(fm.apply)(v, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_unsupported_hf_configurations_are_refused():
    torch.manual_seed(0)
    config = qwen_text_config("Qwen3_5TextConfig", _gdn_shape())
    config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="activation='gelu'"):
        from_torch(qwen35.Qwen3_5GatedDeltaNet(config, 0))


def test_swish_is_silu_and_a_conv_bias_is_refused():
    """transformers' "swish" is SiLU (ACT2FN): converted, same outputs as the "silu" layer; a
    conv bias is refused by name."""
    config = qwen_text_config("Qwen3_5TextConfig", _gdn_shape())
    torch.manual_seed(0)
    silu = qwen35.Qwen3_5GatedDeltaNet(config, 0)
    config.hidden_act = "swish"
    swish = qwen35.Qwen3_5GatedDeltaNet(config, 0)
    swish.load_state_dict(silu.state_dict())
    fm, v = from_torch(swish)
    x = np.random.default_rng(1).standard_normal((B, 5, fm.hidden_size)).astype(np.float32)
    with torch.no_grad():
        want = silu(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(jax.jit(fm.apply)(v, jnp.asarray(x))), want,
                               atol=1e-5)
    biased = qwen35.Qwen3_5GatedDeltaNet(config, 0)
    biased.conv1d.bias = torch.nn.Parameter(torch.zeros(biased.conv1d.out_channels))
    with pytest.raises(ValueError, match="with a conv bias"):
        from_torch(biased)


def test_another_librarys_layer_of_the_same_name_is_refused():
    """A torch module named like a linear-attention module but of no registered class (as
    flash-linear-attention's ``fla.layers.GatedDeltaNet``) gets the "no converter" error."""
    for name in ("GatedDeltaNet", "KimiDeltaAttention", "LinearAttention"):
        foreign = type(name, (torch.nn.Module,), {})()
        with pytest.raises(TypeError, match=f"from_torch: no converter for .*{name}"):
            from_torch(foreign)


def test_the_comparison_can_fail():
    """One weight off by 0.1 %: the check must fail."""
    ref = dict(torch_reference("linear-causal", True))
    params = jax.tree_util.tree_map(lambda a: a, ref["params"])
    params["o_proj"] = dict(params["o_proj"], kernel=params["o_proj"]["kernel"] * 1.001)
    ref["params"] = params
    with pytest.raises(AssertionError, match="output max"):
        check(ref, "recurrent")
