"""CPU timing of the linear-attention layers: Hugging Face's torch layers vs attnhut_jax, same run.

Gated DeltaNet (``Qwen3_5GatedDeltaNet``, a Qwen3.5-like small configuration: hidden 1024, 16
query/key heads and 16 value heads of 128, short convolution 4) and Kimi Delta Attention
(``KimiLinearDeltaAttention``: hidden 1024, 8 heads of 128, convolution 4), batch 1, float32. The
torch layers run transformers' pure-torch fallback (no flash-linear-attention, no causal-conv1d in
this environment: the path a CPU user gets) at ``torch.set_num_threads(2)``; ours are the same
layers' attnhut_jax modules with the same weights (checked: the outputs at the first length are
compared and the difference printed), jit-compiled, at ``impl="auto"`` (the chunked form on CPU).

Per layer and length: forward (no gradient) and forward + backward (gradients of every parameter
and of the input, for a fixed random cotangent) in milliseconds, median of ``--reps`` after one
warm-up call (ours: the compiling call; a torch call longer than ``ONCE_S`` seconds is timed once,
its warm-up effects being under a percent of it), the speedup torch / ours, and the growth
time(32768) / time(8192) of each. A torch case whose estimated peak memory (``_torch_gib``, fitted
to measured peaks of this script) exceeds ``--torch-gib`` is skipped and says so: the Kimi
fallback builds (heads, T, 64, 128) float32 decay masks and their products, 2 GiB each at T = 8192.
``--skip-torch-above T`` times only ours beyond T.

``--growth T`` times only ours, at ``T`` and ``4T`` alternately (a round times one call of
each, each timed call after an untimed one of its length), and prints the growth with the
page faults and user / system CPU time per call. ``--keep-heap`` runs the script (and its
children) with the glibc malloc tunables ``KEEP_HEAP``: XLA:CPU allocates its temporaries with
``malloc`` on every call, and by default glibc serves blocks that large with fresh ``mmap``s,
which the kernel then faults in page by page.

``--projections T`` times only Gated DeltaNet's projections at length T, as two bare
products in torch and in XLA (needs torch): a floor under either framework's forward.

``--fits T`` instead times and measures only our forward + backward at length T (default run of
the goal: ``--fits 65536``), in this process: the peak resident memory (``VmHWM``, reset after the
weights are built, compilation included) and XLA's own figure for the compiled gradient
(arguments + outputs + temporaries).

    .venv-parity/bin/python benchmarks/linear_attention_cpu.py                  # 2048 8192 32768
    .venv-parity/bin/python benchmarks/linear_attention_cpu.py --lengths 2048 --reps 1
    .venv-parity/bin/python benchmarks/linear_attention_cpu.py --fits 65536
    .venv/bin/python benchmarks/linear_attention_cpu.py --growth 8192 [--keep-heap]
    .venv-parity/bin/python benchmarks/linear_attention_cpu.py --projections 8192 --reps 5

Goals (issue 14): ours at least 5x faster than the torch fallback at T = 8192, time(32768) /
time(8192) <= 4.5, and T = 65536 forward + backward fitting in this 23 GiB machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

if not __package__:  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnhut_jax as ah  # noqa: E402

HIDDEN = 1024
GDN = dict(num_query_key_heads=16, num_value_heads=16, head_qk_dim=128, head_v_dim=128,
           conv_size=4, norm_eps=1e-6)
KDA = dict(num_heads=8, head_dim=128, conv_size=4, norm_eps=1e-5)  # KimiLinearConfig's eps
LAYERS = ("GatedDeltaNet", "KimiDeltaAttention")
# glibc malloc settings that keep XLA:CPU's per-call temporaries in the heap (``--keep-heap``):
# one arena (a thread's own arena maps any block over its 64 MiB heaps afresh, whatever
# mmap_max says), no mmap, no trimming. Without them every call maps its temporaries anew and
# the kernel faults them in page by page.
KEEP_HEAP = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
             f"glibc.malloc.trim_threshold={2**36}")
ONCE_S = 5.0  # a torch call longer than this is timed once (no separate warm-up)


# --------------------------------------------------------------------------- memory

def _status_gib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB
    return float("nan")


def _reset_peak() -> None:
    """Reset this process's peak resident memory (``VmHWM``) to its current resident size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# --------------------------------------------------------------------------- timing

def _median_ms(fn: Callable[[], object], reps: int, warm: bool = True) -> float:
    """Median wall time of ``reps`` calls after a warm-up call (``warm=False``: the first call
    is timed too, for calls that take seconds)."""
    times = []
    if warm:
        fn()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _torch_ms(fn: Callable[[], object], reps: int) -> float:
    """Torch timing: a call longer than ``ONCE_S`` is its own (single) measurement."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > ONCE_S:
        return first * 1e3
    return _median_ms(fn, reps, warm=False)


# --------------------------------------------------------------------------- the layers

def torch_layer(name: str):
    """The Hugging Face layer of ``name`` at this benchmark's configuration, seeded."""
    import torch
    from transformers.models.kimi_linear.configuration_kimi_linear import KimiLinearConfig
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearDeltaAttention
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    torch.manual_seed(0)
    if name == "GatedDeltaNet":
        cfg = Qwen3_5TextConfig(
            hidden_size=HIDDEN, linear_num_key_heads=GDN["num_query_key_heads"],
            linear_num_value_heads=GDN["num_value_heads"], linear_key_head_dim=GDN["head_qk_dim"],
            linear_value_head_dim=GDN["head_v_dim"], linear_conv_kernel_dim=GDN["conv_size"],
            rms_norm_eps=GDN["norm_eps"], num_hidden_layers=1, layer_types=["linear_attention"])
        return Qwen3_5GatedDeltaNet(cfg, 0).eval()
    cfg = KimiLinearConfig(hidden_size=HIDDEN, num_hidden_layers=1, rms_norm_eps=KDA["norm_eps"],
                           linear_attn_config=dict(
                               num_heads=KDA["num_heads"], head_dim=KDA["head_dim"],
                               short_conv_kernel_size=KDA["conv_size"], kda_layers=[1],
                               full_attn_layers=[]))
    layer = KimiLinearDeltaAttention(cfg, 0).eval()
    with torch.no_grad():  # the constructor leaves these two uninitialised (torch.empty)
        gate = layer.forget_gate
        gate.A_log.copy_(torch.log(torch.empty_like(gate.A_log).uniform_(1, 16)))
        dt = torch.exp(torch.empty_like(gate.dt_bias).uniform_(np.log(1e-3), np.log(1e-1)))
        gate.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
    return layer


def our_layer(name: str, **kw) -> ah.GatedDeltaNet | ah.KimiDeltaAttention:
    if name == "GatedDeltaNet":
        return ah.GatedDeltaNet(HIDDEN, **GDN, **kw)
    return ah.KimiDeltaAttention(HIDDEN, **KDA, **kw)


def our_params_from_torch(fm, state: dict[str, np.ndarray]) -> dict:
    """Our parameter tree holding the torch layer's weights: the names are the torch layer's
    (``a.b.weight`` -> ``a/b/kernel``), a linear weight transposed, the depthwise conv's
    (C, 1, K) weight as (K, C), Kimi's (1, 1, N, 1) ``A_log`` as (N,); every shape checked."""
    import flax.linen as nn
    from flax.traverse_util import flatten_dict, unflatten_dict

    want = flatten_dict(nn.meta.unbox(jax.eval_shape(fm.init, jax.random.key(0),
                                                     jnp.zeros((1, 8, HIDDEN))))["params"])
    got = {}
    for path, w in state.items():
        *mods, leaf = path.split(".")
        if leaf == "weight" and w.ndim == 2:
            key, w = (*mods, "kernel"), w.T
        elif leaf == "weight" and w.ndim == 3:
            key, w = (*mods, "kernel"), w[:, 0, :].T
        else:
            key = (*mods, leaf)
        if key not in want:
            raise KeyError(f"torch parameter {path} has no counterpart {'/'.join(key)}")
        got[key] = jnp.asarray(w.reshape(want[key].shape))
    missing = set(want) - set(got)
    if missing:
        raise KeyError(f"no torch weight for {sorted('/'.join(k) for k in missing)}")
    return unflatten_dict(got)


def _torch_gib(name: str, t: int, grad: bool) -> float:
    """Estimated peak resident GiB of the torch fallback (batch 1, this configuration), fitted
    to peaks measured by this script (``peak`` column)."""
    if name == "GatedDeltaNet":
        return 0.5 + t * (0.34 if grad else 0.13) / 1024
    mask = KDA["num_heads"] * t * 64 * KDA["head_dim"] * 4 / 2**30  # one (N, T, C, H) float32
    return 0.5 + mask * (8.0 if grad else 3.3)


# --------------------------------------------------------------------------- the two modes

def _compiled_calls(fm) -> tuple[Callable, Callable]:
    """Our jitted forward ``(params, x) -> out`` and forward + backward ``(params, x, cot) ->``
    the gradients of ``<out, cot>`` for every parameter and the input."""
    fwd = jax.jit(lambda p, x: fm.apply({"params": p}, x))
    grad = jax.jit(jax.grad(lambda p, x, c: jnp.vdot(fm.apply({"params": p}, x), c),
                            argnums=(0, 1)))
    return fwd, grad


def fits(name: str, t: int, reps: int) -> None:
    """Our forward + backward at length ``t``: time, peak resident memory, XLA's figure."""
    fm = our_layer(name)
    x = jax.random.normal(jax.random.key(1), (1, t, HIDDEN), jnp.float32)
    cot = jax.random.normal(jax.random.key(2), (1, t, HIDDEN), jnp.float32)
    params = jax.jit(fm.init)(jax.random.key(0), x[:, :64])["params"]
    _, grad = _compiled_calls(fm)
    _reset_peak()
    base = _status_gib("VmRSS")
    t0 = time.perf_counter()
    compiled = grad.lower(params, x, cot).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes) / 2**30
    ms = _median_ms(lambda: jax.block_until_ready(compiled(params, x, cot)), reps)
    print(f"{name:<20} T={t}: forward + backward {ms:,.0f} ms (median of {reps}, compile "
          f"{compile_s:.1f} s); peak resident {_status_gib('VmHWM'):.2f} GiB (process before "
          f"compiling {base:.2f} GiB); XLA arguments + outputs + temporaries {xla:.2f} GiB",
          flush=True)


def _usage() -> tuple[int, float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_utime, r.ru_stime


def growth(name: str, t: int, rounds: int) -> None:
    """time(4t) / time(t) of our forward and forward + backward, the two lengths alternating:
    each round times one call at ``t`` then one at ``4t``, so a change of the machine's speed
    during the run reaches both lengths alike. Each timed call follows an untimed call of the
    same length (a call right after a longer one pays for the memory that one released: the
    forward at 8192 takes about 20% longer). Printed per mode: the medians, their ratio, the
    range of the rounds' own ratios, and per call the page faults and the user / system CPU
    seconds (``getrusage``) at each length."""
    fm = our_layer(name)
    params = jax.jit(fm.init)(jax.random.key(0), jnp.zeros((1, 64, HIDDEN), jnp.float32))["params"]
    fwd, grad = _compiled_calls(fm)
    data = {n: tuple(jnp.asarray(a) for a in _inputs(n)) for n in (t, 4 * t)}
    calls = {("fwd", n): (lambda n=n: fwd(params, data[n][0])) for n in (t, 4 * t)}
    calls |= {("fwd+bwd", n): (lambda n=n: grad(params, *data[n])) for n in (t, 4 * t)}
    for mode in ("fwd", "fwd+bwd"):
        ms = {t: [], 4 * t: []}
        use = {t: np.zeros(3), 4 * t: np.zeros(3)}
        for _ in range(rounds):
            for n in (t, 4 * t):
                jax.block_until_ready(calls[mode, n]())
                u0, t0 = _usage(), time.perf_counter()
                jax.block_until_ready(calls[mode, n]())
                ms[n].append((time.perf_counter() - t0) * 1e3)
                use[n] += np.subtract(_usage(), u0)
        ratios = [b / a for a, b in zip(ms[t], ms[4 * t], strict=True)]
        small, big = statistics.median(ms[t]), statistics.median(ms[4 * t])
        per = {n: use[n] / rounds for n in use}
        print(f"{name:<20} {mode:<8} T={t}: {small:7.0f} ms  T={4 * t}: {big:7.0f} ms  "
              f"growth {big / small:.2f} (rounds {min(ratios):.2f}-{max(ratios):.2f})  "
              f"per call: faults {per[t][0]:,.0f} -> {per[4 * t][0]:,.0f}, user "
              f"{per[t][1]:.2f} -> {per[4 * t][1]:.2f} s, system {per[t][2]:.2f} -> "
              f"{per[4 * t][2]:.2f} s", flush=True)


def projections(t: int, reps: int) -> None:
    """Gated DeltaNet's projections alone at length ``t``, torch and XLA in this process: the
    in-projections (hidden -> q, k, v, z and a, b) and the output projection as two products of
    the layer's sizes (the floor of either framework's forward: every other op is extra)."""
    import torch

    torch.set_num_threads(2)
    heads, width = GDN["num_value_heads"], GDN["head_v_dim"]
    n_in = 2 * GDN["num_query_key_heads"] * GDN["head_qk_dim"] + 2 * heads * width + 2 * heads
    rng = np.random.default_rng(0)
    x = rng.standard_normal((t, HIDDEN), dtype=np.float32)
    w_in = rng.standard_normal((HIDDEN, n_in), dtype=np.float32) * HIDDEN ** -0.5
    w_out = rng.standard_normal((heads * width, HIDDEN), dtype=np.float32) * HIDDEN ** -0.5
    xt, wt_in, wt_out = map(torch.from_numpy, (x, w_in, w_out))

    def torch_pass():
        return (xt @ wt_in)[:, :heads * width].contiguous() @ wt_out

    xla = jax.jit(lambda x, a, b: (x @ a)[:, :heads * width] @ b)
    xj, wj_in, wj_out = map(jnp.asarray, (x, w_in, w_out))
    macs = t * (HIDDEN * n_in + heads * width * HIDDEN)
    print(f"GatedDeltaNet projections at T={t} ({HIDDEN} x {n_in} and {heads * width} x "
          f"{HIDDEN}, {macs / 1e9:.0f} G multiply-adds), median of {reps}: torch "
          f"{_median_ms(torch_pass, reps):.0f} ms, XLA (jax {jax.__version__}) "
          f"{_median_ms(lambda: jax.block_until_ready(xla(xj, wj_in, wj_out)), reps):.0f} ms")


def _inputs(t: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(t)
    return (rng.standard_normal((1, t, HIDDEN), dtype=np.float32),
            rng.standard_normal((1, t, HIDDEN), dtype=np.float32))


def ours_side(names: list[str], lengths: list[int], reps: int,
              states: dict[str, dict[str, np.ndarray]]) -> tuple[dict, dict, dict]:
    """Our timings ``{(layer, mode, T): ms}``, peaks ``{(layer, T): GiB}`` (forward + backward,
    compilation included) and the forward output at the first length per layer."""
    times, peaks, outputs = {}, {}, {}
    for name in names:
        fm = our_layer(name)
        params = our_params_from_torch(fm, states[name])
        fwd, grad = _compiled_calls(fm)
        for i, t in enumerate(lengths):
            xj, cj = (jnp.asarray(a) for a in _inputs(t))
            times[name, "ours fwd", t] = _median_ms(
                lambda f=fwd, p=params, x=xj: jax.block_until_ready(f(p, x)), reps)
            if i == 0:
                outputs[name] = np.asarray(fwd(params, xj))
            _reset_peak()
            times[name, "ours f+b", t] = _median_ms(
                lambda f=grad, p=params, x=xj, c=cj: jax.block_until_ready(f(p, x, c)), reps)
            peaks[name, t] = _status_gib("VmHWM")
            print(f"  ours {name} T={t}: fwd {times[name, 'ours fwd', t]:.0f} ms, fwd+bwd "
                  f"{times[name, 'ours f+b', t]:.0f} ms", file=sys.stderr, flush=True)
    return times, peaks, outputs


def _ours_in(python: str, names, lengths, reps, states) -> tuple[dict, dict, dict]:
    """``ours_side`` run by another interpreter (``--ours-python``), weights and results through
    a temporary directory (.npz and JSON: nothing unpickled)."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        np.savez(f"{tmp}/weights.npz", **{f"{n}|{k}": v for n, st in states.items()
                                          for k, v in st.items()})
        cmd = [python, __file__, "--ours-only", tmp, "--layers", *names, "--lengths",
               *map(str, lengths), "--reps", str(reps)]
        subprocess.run(cmd, check=True)
        res = json.loads(Path(f"{tmp}/times.json").read_text())
        with np.load(f"{tmp}/outputs.npz") as z:
            outputs = {k: z[k] for k in z.files}
    times = {(n, m, t): ms for n, m, t, ms in res["times"]}
    peaks = {(n, t): g for n, t, g in res["peaks"]}
    return times, peaks, outputs


def _ours_only(tmp: str, names, lengths, reps) -> None:
    import json

    states: dict[str, dict[str, np.ndarray]] = {n: {} for n in names}
    with np.load(f"{tmp}/weights.npz") as z:
        for key in z.files:
            n, k = key.split("|")
            states[n][k] = z[key]
    times, peaks, outputs = ours_side(names, lengths, reps, states)
    Path(f"{tmp}/times.json").write_text(json.dumps(dict(
        times=[[*k, v] for k, v in times.items()], peaks=[[*k, v] for k, v in peaks.items()],
        jax=jax.__version__)))
    np.savez(f"{tmp}/outputs.npz", **outputs)


def compare(names: list[str], lengths: list[int], reps: int, skip_torch_above: int | None,
            torch_gib: float, ours_python: str | None) -> None:
    import torch

    torch.set_num_threads(2)
    layers = {name: torch_layer(name) for name in names}
    states = {n: {k: v.detach().numpy() for k, v in tm.state_dict().items()}
              for n, tm in layers.items()}
    if ours_python is None:
        times, peaks, outputs = ours_side(names, lengths, reps, states)
        ours_jax = jax.__version__
    else:
        times, peaks, outputs = _ours_in(ours_python, names, lengths, reps, states)
        ours_jax = "see --ours-python"
    print(f"ours: jax {ours_jax} (cpu{', ' + ours_python if ours_python else ''}); torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads); float32, batch 1; ms, median "
          f"of {reps}; peak: GiB resident during fwd+bwd (ours: compilation included)")
    for name, tm in layers.items():
        with torch.no_grad():
            want = tm(torch.from_numpy(_inputs(lengths[0])[0])).numpy()
        err = np.abs(outputs[name] - want).max() / np.abs(want).max()
        print(f"  {name}: same weights, max |ours - torch| / max |torch| = {err:.1e} at "
              f"T={lengths[0]}")
    head = (f"{'layer':<20} {'T':>6} {'torch fwd':>10} {'ours fwd':>9} {'speedup':>8} "
            f"{'torch f+b':>10} {'ours f+b':>9} {'speedup':>8} {'torch peak':>10} {'ours peak':>9}")
    print(head)
    for name, tm in layers.items():
        for t in lengths:
            x, cot = _inputs(t)
            cells = {"ours peak": f"{peaks[name, t]:9.2f}"}
            with_torch = skip_torch_above is None or t <= skip_torch_above
            for mode, need_grad in (("torch fwd", False), ("torch f+b", True)):
                est = _torch_gib(name, t, need_grad)
                if not with_torch:
                    cells[mode] = f"{'-':>10}"
                elif est > torch_gib:
                    cells[mode] = f"{f'skip {est:.0f}G':>10}"
                elif need_grad:
                    xt = torch.from_numpy(x).requires_grad_()
                    ct = torch.from_numpy(cot)

                    def step(xt=xt, ct=ct, tm=tm):
                        tm.zero_grad(set_to_none=True)
                        xt.grad = None
                        (tm(xt) * ct).sum().backward()

                    _reset_peak()
                    times[name, mode, t] = _torch_ms(step, reps)
                    cells["torch peak"] = f"{_status_gib('VmHWM'):10.2f}"
                else:
                    xt = torch.from_numpy(x)
                    with torch.no_grad():
                        times[name, mode, t] = _torch_ms(lambda xt=xt, tm=tm: tm(xt), reps)
            row = [f"{name:<20} {t:>6}"]
            for side in ("fwd", "f+b"):
                tt, ours = times.get((name, f"torch {side}", t)), times[name, f"ours {side}", t]
                row.append(f"{tt:10.0f}" if tt is not None else cells[f"torch {side}"])
                row.append(f"{ours:9.0f}")
                row.append(f"{tt / ours:7.1f}x" if tt is not None else f"{'':>8}")
            row.append(cells.get("torch peak", f"{'':>10}"))
            row.append(cells["ours peak"])
            print(" ".join(row), flush=True)
    print("\ngrowth time(4T) / time(T):")
    for (name, mode, t), ms in sorted(times.items()):
        if (name, mode, 4 * t) in times:
            print(f"  {name:<20} {mode:<9} T={t:>6} -> {4 * t:>6}: "
                  f"{times[name, mode, 4 * t] / ms:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-torch-above", type=int, default=None,
                    help="time only ours at lengths above this")
    ap.add_argument("--torch-gib", type=float, default=10.0,
                    help="skip a torch case whose estimated peak memory exceeds this")
    ap.add_argument("--fits", type=int, default=None, metavar="T",
                    help="only our forward + backward at length T: time and peak memory")
    ap.add_argument("--growth", type=int, default=None, metavar="T",
                    help="only ours: time(4T) / time(T), the two lengths alternating")
    ap.add_argument("--projections", type=int, default=None, metavar="T",
                    help="only Gated DeltaNet's projections at length T, torch and XLA")
    ap.add_argument("--keep-heap", action="store_true",
                    help="run with glibc malloc tunables that keep freed memory in the heap "
                         "(KEEP_HEAP; children inherit them)")
    ap.add_argument("--ours-python", default=None, metavar="PYTHON",
                    help="time ours in a child process of this interpreter (another jax)")
    ap.add_argument("--ours-only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.keep_heap and os.environ.get("GLIBC_TUNABLES") != KEEP_HEAP:
        # glibc reads its tunables at start-up: run this script again with them set
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "GLIBC_TUNABLES": KEEP_HEAP})
    if args.ours_only is not None:
        _ours_only(args.ours_only, args.layers, args.lengths, args.reps)
        return
    if args.fits is not None:
        print(f"jax {jax.__version__} ({jax.default_backend()}), float32, batch 1")
        for name in args.layers:
            fits(name, args.fits, args.reps)
        return
    if args.projections is not None:
        projections(args.projections, args.reps)
        return
    if args.growth is not None:
        print(f"jax {jax.__version__} ({jax.default_backend()}), float32, batch 1, "
              f"{args.reps} rounds")
        for name in args.layers:
            growth(name, args.growth, args.reps)
        return
    compare(args.layers, args.lengths, args.reps, args.skip_torch_above, args.torch_gib,
            args.ours_python)


if __name__ == "__main__":
    main()
