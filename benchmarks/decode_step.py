"""CPU timing of incremental decoding: one decode step against the cache length, and a prefill.

Every decoding mechanism at dim 512, 8 query heads, batch 1, float32, XLA (what ``decode=True``
runs whatever ``impl``), with the knobs in ``CONFIGS`` (stated in the output):

* step: milliseconds of one jit-compiled single-token ``apply(..., mutable=["cache"])`` on a
  cache of ``max_len = n`` holding n - 1 tokens (median of ``--reps`` after ``--warmup``; the
  cache is donated, so the step writes in place, and its index is set back to n - 1 before every
  call). The cache is not prefilled token by token: its float arrays are filled with random
  normals and every ``index`` set to n - 1 (integer arrays other than ``index`` keep their
  initial values and are listed; the step's cost does not depend on the values).
* step in a loop (unless ``--no-loop``): milliseconds per step of ``LOOP_STEPS`` such steps run
  inside one compiled ``lax.fori_loop`` (each on a different token), as a compiled generation
  loop runs them: the step without the Python and runtime dispatch of a call, which is much of
  a fast step here.
* the selectors' split (DSA, MSA, CSA): the scoring pass timed alone on random arrays of the
  cache's sizes (the module's own index widths): DSA ``sum_i w_i relu(q_i . k_s)`` over the n
  cached index keys then top-k tokens; MSA ``q_g . k_s`` per kv group (``cached_block_scores``),
  max-pooled over blocks, then top-k blocks; CSA as DSA over the n / rate compressed entries.
  ``rest`` = step - scoring: the projections, the gather and the attention over the selected
  keys, which should not grow with n.
* dense floor: a plain XLA ``softmax(q K^T) V`` of one query over n cached keys and values of 8
  heads, head-major (B, N, S, H) as the dense caches (no cache write, no projections): the
  least a dense step of this width costs, beside which the Standard step's own overheads
  (copies of its cache) show.
* prefill: seconds to append a ``--prefill-len`` prompt (default 32768) through the cache in
  chunks of ``--chunk`` tokens (default 1024) into a cache of that length (each chunk is one
  jit-compiled call, compiled once; the dense path's scores are (N, chunk, max_len)); for DSA
  (``PREFILL_FORWARD``) the decode=False forward over the prompt instead (``--prefill-mode``).
* goals: a DSA and an MSA step at the longest length (128k by default) each >= 5x faster than
  the StandardAttention step there, judged on the steps in a compiled loop (without
  ``--no-loop``; the per-call ratio is printed beside it).

    .venv/bin/python benchmarks/decode_step.py                  # 1k 8k 32k 128k, prefill 32k
    .venv/bin/python benchmarks/decode_step.py --quick          # 1k 4k, prefill 4k
    .venv/bin/python benchmarks/decode_step.py --mechanisms standard deepseek_sparse \\
        --lengths 1024 131072 --no-prefill

Memory at 128k, batch 1: the Standard cache is 512 MiB in float32 (K and V), the others less;
the chunked prefill's dense scores at chunk 1024 and 32k are 1 GiB per (N, chunk, max_len)
array.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

if not __package__:  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnhut_jax as ah  # noqa: E402
from attnhut_jax import cache as cache_lib  # noqa: E402
from attnhut_jax.deepseek_sparse import cached_index_scores  # noqa: E402
from attnhut_jax.minimax_sparse import cached_block_scores  # noqa: E402

DIM, HEADS = 512, 8
# name -> (class, arguments besides dim and num_heads)
CONFIGS: dict[str, tuple[type, dict]] = {
    "standard": (ah.StandardAttention, dict(causal=True)),
    "mqa": (ah.MultiQueryAttention, dict(causal=True)),
    "gqa": (ah.GroupedQueryAttention, dict(num_kv_heads=2, causal=True)),
    "mla": (ah.MultiHeadLatentAttention, dict()),
    "differential": (ah.DifferentialAttention, dict(num_heads=HEADS // 2)),
    "delta": (ah.DeltaAttention, dict(window=256, stride=16)),
    "deepseek_sparse": (ah.DeepSeekSparseAttention, dict(top_k=2048)),  # DeepSeek-V3.2's top_k
    "deepseek_sparse_top64": (ah.DeepSeekSparseAttention, dict()),  # the module's defaults
    "minimax_sparse": (ah.MiniMaxSparseAttention, dict(num_kv_groups=2, block_size=64,
                                                       top_k=16)),
    "heavily_compressed": (ah.HeavilyCompressedAttention, dict(compression_rate=16, window=128)),
    "compressed_sparse": (ah.CompressedSparseAttention, dict(compression_rate=4, top_k=128,
                                                             window=128)),
}
SELECTORS = ("deepseek_sparse", "deepseek_sparse_top64", "minimax_sparse", "compressed_sparse")
GOAL_SPEEDUP, GOAL_LENGTH = 5.0, 131072
LOOP_STEPS = 8  # decode steps per compiled loop (time_step's loop_steps)


# ``--prefill-mode auto``: these time the decode=False forward over the prompt instead of the
# chunked prefill through the cache. DSA's decode chunk gathers top_k keys and values per query
# ((chunk, top_k, N, H): 4 GiB at chunk 1024, top_k 2048), a minute per chunk on this CPU, while
# its forward's token-sparse path is O(T) memory.
PREFILL_FORWARD = ("deepseek_sparse", "deepseek_sparse_top64")


def build(name: str, decode: bool = True):
    """The module of ``name`` (with ``decode=True``: None when it cannot decode yet)."""
    cls, kw = CONFIGS[name]
    if decode and "decode" not in {f.name for f in dataclasses.fields(cls)}:
        return None
    kw = dict(kw)
    heads = kw.pop("num_heads", HEADS)
    return cls(DIM, heads, **kw, **({"decode": True} if decode else {}))


def describe(name: str) -> str:
    cls, kw = CONFIGS[name]
    args = [str(DIM), str(kw.get("num_heads", HEADS))]
    args += [f"{k}={v}" for k, v in kw.items() if k not in ("causal", "num_heads")]
    return f"{cls.__name__}({', '.join(args)})"


def median_ms(fn, warmup: int, reps: int) -> float:
    """Median milliseconds of ``reps`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def release() -> None:
    """Drop JAX's compiled programs and collect garbage between timings."""
    gc.collect()
    jax.clear_caches()


def _is_index(path) -> bool:
    return getattr(path[-1], "key", None) == cache_lib.INDEX


def set_index(cache, value: int):
    """``cache`` with every ``index`` array set to ``value`` (the other arrays shared)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.full_like(a, value) if _is_index(p) else a, cache)


def fill_cache(cache, n: int, key) -> tuple[dict, list[str]]:
    """Random normals in every float array, every ``index`` at n - 1; the names of the other
    integer arrays (left as initialised)."""
    flat, tree = jax.tree_util.tree_flatten_with_path(cache)
    kept = [jax.tree_util.keystr(p) for p, a in flat
            if not jnp.issubdtype(a.dtype, jnp.floating) and not _is_index(p)]

    @functools.partial(jax.jit, donate_argnums=0)
    def fill(leaves):
        out = []
        for i, ((p, _), a) in enumerate(zip(flat, leaves, strict=True)):
            if jnp.issubdtype(a.dtype, jnp.floating):
                out.append(jax.random.normal(jax.random.fold_in(key, i), a.shape, a.dtype))
            elif _is_index(p):
                out.append(jnp.full_like(a, n - 1))
            else:
                out.append(a)
        return out

    return jax.tree_util.tree_unflatten(tree, fill([a for _, a in flat])), kept


def init(m, batch: int, n: int):
    """(params, empty cache) of ``m`` for a cache of n tokens."""
    variables = jax.jit(lambda k: m.init(k, jnp.zeros((batch, n, DIM))))(jax.random.key(0))
    return variables["params"], variables["cache"]


def compiled_step(m, params, cache, x, index: int | None = None):
    """The jit-compiled (cache donated) call ``(params, cache, x) -> (out, cache)``, compiled
    ahead of time for these shapes. ``index``: every cache index is first reset to it, inside
    the compiled call (a timed loop then decodes at the same length each call, without eager
    bookkeeping between calls)."""
    def step(params, cache, x):
        if index is not None:
            cache = set_index(cache, index)
        out, state = m.apply({"params": params, "cache": cache}, x, mutable=["cache"])
        return out, state["cache"]

    return jax.jit(step, donate_argnums=1).lower(params, cache, x).compile()


def compiled_loop(m, params, cache, x, index: int, steps: int):
    """The jit-compiled (cache donated) ``(params, cache, x) -> (checksum, cache)`` that runs
    ``steps`` decode steps at cache index ``index`` in one ``lax.fori_loop``: each iteration
    resets every index to ``index`` and appends a different token (x scaled by the iteration, so
    nothing is loop-invariant), the way a compiled generation loop runs its steps, with no Python
    or runtime dispatch between them."""
    def body(i, carry):
        acc, cache = carry
        xi = x * (1.0 + i.astype(x.dtype) * 1e-3)
        out, state = m.apply({"params": params, "cache": set_index(cache, index)}, xi,
                             mutable=["cache"])
        return acc + out[0, 0, 0], state["cache"]

    def loop(params, cache, x):
        return jax.lax.fori_loop(0, steps, body, (jnp.zeros((), x.dtype), cache))

    return jax.jit(loop, donate_argnums=1).lower(params, cache, x).compile()


def time_step(name: str, n: int, warmup: int, reps: int,
              loop_steps: int | None = None) -> tuple[float, list[str]]:
    """(milliseconds per step at cache length n, the integer cache arrays left as initialised).
    One compiled call per step (``compiled_step``), or with ``loop_steps`` that many steps per
    compiled loop (``compiled_loop``; the loop's time divided by ``loop_steps``); median of
    ``reps`` after ``warmup``."""
    m = build(name)
    params, cache = init(m, 1, n)
    cache, kept = fill_cache(cache, n, jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (1, 1, DIM))
    if loop_steps is None:
        fn, per = compiled_step(m, params, cache, x, index=n - 1), 1
    else:
        fn, per = compiled_loop(m, params, cache, x, n - 1, loop_steps), loop_steps
    state = {"cache": cache}

    def run():
        out, state["cache"] = fn(params, state["cache"], x)
        out.block_until_ready()

    return median_ms(run, warmup, reps) / per, kept


def scoring_fn(name: str, n: int):
    """(jitted scoring pass, its operands) at the module's index sizes for cache length n."""
    m = build(name) or CONFIGS[name][0](DIM, HEADS, **CONFIGS[name][1])
    ks = jax.random.split(jax.random.key(3), 3)
    if name == "minimax_sparse":
        g, e, bs = m.num_kv_groups, m.resolved_dims()[0], m.block_size
        q, k = jax.random.normal(ks[0], (g, e)), jax.random.normal(ks[1], (n, e))

        def score(q, k):  # the keys (S, E) in their cache layout, as the step reads them: the
            # step's own block scores (one query, every cached key kept) and their top-k
            s_GJ = cached_block_scores(q[None, None], k[None], jnp.ones((1, 1, n), bool),
                                       block_size=bs)[0, :, 0]
            return jax.lax.top_k(s_GJ, m.top_k)[1]

        return jax.jit(score), (q, k)
    if name.startswith("deepseek_sparse"):
        i, e, s = m.num_index_heads, m.index_head_dim, n
    else:  # compressed_sparse: the compressed entries
        i, e, s = m.num_index_heads, m.index_dim, n // m.compression_rate
    q, k = jax.random.normal(ks[0], (i, e)), jax.random.normal(ks[1], (s, e))
    w = jax.random.normal(ks[2], (i,))

    def score(q, k, w):  # the keys (S, E) in their cache layout, as the step reads them: the
        # step's own scoring function (one query, every cached key kept) and its top-k
        s_S = cached_index_scores(q[None, None], k[None], w[None, None],
                                  jnp.ones((1, 1, s), bool))[0, 0]
        return jax.lax.top_k(s_S, min(m.top_k, s))[1]

    return jax.jit(score), (q, k, w)


def time_scoring(name: str, n: int, warmup: int, reps: int) -> float:
    f, args = scoring_fn(name, n)
    return median_ms(lambda: f(*args).block_until_ready(), warmup, reps)


def time_floor(n: int, warmup: int, reps: int) -> float:
    ks = jax.random.split(jax.random.key(5), 3)
    hd = DIM // HEADS
    q = jax.random.normal(ks[0], (1, HEADS, 1, hd))
    # head-major keys and values, as the dense caches hold them
    k, v = (jax.random.normal(kk, (1, HEADS, n, hd)) for kk in ks[1:])

    @jax.jit
    def attend(q, k, v):  # the keys are the product's left operand in their own (S, H) rows;
        # the values are read as a weighted sum of their rows (cache.read_values' decode form)
        logits_BNST = jax.lax.dot_general(k, q, (((3,), (3,)), ((0, 1), (0, 1))))
        w = jax.nn.softmax(logits_BNST.swapaxes(2, 3) * hd ** -0.5, axis=-1)
        return jnp.sum(w[..., None] * v[:, :, None], axis=3).swapaxes(1, 2)

    return median_ms(lambda: attend(q, k, v).block_until_ready(), warmup, reps)


def time_prefill(name: str, length: int, chunk: int) -> tuple[float, float]:
    """(compile seconds, seconds) to append ``length`` tokens in chunks of ``chunk``."""
    m = build(name)
    params, cache = init(m, 1, length)
    x = jax.random.normal(jax.random.key(4), (1, length, DIM))
    t0 = time.perf_counter()
    step = compiled_step(m, params, cache, x[:, :chunk])
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for a in range(0, length, chunk):
        out, cache = step(params, cache, x[:, a:a + chunk])
    out.block_until_ready()
    return compile_s, time.perf_counter() - t0


def time_forward(name: str, length: int) -> tuple[float, float]:
    """(compile seconds, seconds) of the decode=False forward over ``length`` tokens."""
    m = build(name, decode=False)
    x = jax.random.normal(jax.random.key(4), (1, length, DIM))
    params = jax.jit(m.init)(jax.random.key(0), x[:, :min(length, 256)])["params"]
    t0 = time.perf_counter()
    f = jax.jit(m.apply).lower({"params": params}, x).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(f({"params": params}, x))
    return compile_s, time.perf_counter() - t0


def _len(n: int) -> str:
    return f"{n >> 10}k" if n % 1024 == 0 else str(n)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mechanisms", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768, 131072])
    ap.add_argument("--prefill-len", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk size")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--prefill-mode", choices=("auto", "cache", "forward"), default="auto",
                    help="cache: chunked through the cache; forward: the decode=False forward; "
                         f"auto: forward for {', '.join(PREFILL_FORWARD)}, cache otherwise")
    ap.add_argument("--warmup", type=int, default=8,
                    help="untimed calls first (a step's first few calls after the first run up "
                         "to 3x slower on this machine)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--no-loop", action="store_true",
                    help="skip the steps timed inside one compiled loop")
    ap.add_argument("--quick", action="store_true", help="lengths 1k 4k, prefill 4k, 3 reps")
    a = ap.parse_args(argv)
    if a.quick:
        a.lengths, a.prefill_len, a.reps, a.warmup = [1024, 4096], 4096, 3, 2
    if a.prefill_len % a.chunk:
        raise ValueError(f"--prefill-len {a.prefill_len} must be a multiple of --chunk {a.chunk}")

    print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.devices()[0].device_kind}); "
          f"dim {DIM}, {HEADS} heads, batch 1, float32; step ms = median of {a.reps} after "
          f"{a.warmup} warmup")
    steps: dict[str, dict[int, float]] = {}
    looped: dict[str, dict[int, float]] = {}
    scoring: dict[str, dict[int, float]] = {}
    prefill: dict[str, tuple[float, float]] = {}
    via: dict[str, str] = {}
    pending, notes = [], []
    floor = {}
    for n in a.lengths:
        floor[n] = time_floor(n, a.warmup, a.reps)
        print(f"  {'dense floor':<20} n={n:>7}  {floor[n]:9.3f} ms", flush=True)
    for name in a.mechanisms:
        if build(name) is None:
            pending.append(name)
            continue
        steps[name] = {}
        for n in a.lengths:
            # each timing starts from released programs and arrays (``release``): a fast step
            # timed right after a Standard step at 128k ran up to 2x slower on this machine
            # while the latter's were still held
            release()
            steps[name][n], kept = time_step(name, n, a.warmup, a.reps)
            if kept and n == a.lengths[0]:
                notes.append(f"{name}: integer cache arrays left as initialised: {kept}")
            if not a.no_loop:
                release()
                looped.setdefault(name, {})[n] = time_step(
                    name, n, max(1, a.warmup // 4), max(3, a.reps // 3), LOOP_STEPS)[0]
            if name in SELECTORS:
                scoring.setdefault(name, {})[n] = time_scoring(name, n, a.warmup, a.reps)
            print(f"  {name:<20} n={n:>7}  step {steps[name][n]:9.3f} ms"
                  + (f"  in loop {looped[name][n]:9.3f} ms" if name in looped else "")
                  + (f"  scoring {scoring[name][n]:8.3f} ms" if name in scoring else ""),
                  flush=True)
        if not a.no_prefill:
            via[name] = a.prefill_mode if a.prefill_mode != "auto" else (
                "forward" if name in PREFILL_FORWARD else "cache")
            prefill[name] = (time_forward(name, a.prefill_len) if via[name] == "forward"
                             else time_prefill(name, a.prefill_len, a.chunk))
            print(f"  {name:<20} prefill {a.prefill_len} ({via[name]}) in {prefill[name][1]:.2f} s"
                  f" (compile {prefill[name][0]:.1f} s)", flush=True)

    ls = [_len(n) for n in a.lengths]
    lines = ["", f"Decode step, ms (dim {DIM}, {HEADS} heads, batch 1, float32, CPU)"
             + ("" if a.no_prefill else f"; prefill of {_len(a.prefill_len)} tokens, via cache: "
                f"through the cache in chunks of {a.chunk}, via forward: the decode=False "
                f"forward (fills no cache)"), "",
             "| mechanism | configuration | " + " | ".join(f"step {x}" for x in ls)
             + ("" if a.no_prefill else f" | prefill {_len(a.prefill_len)} s | prefill tok/s | via")
             + " |",
             "|---|---|" + "---:|" * (len(ls) + (0 if a.no_prefill else 2))
             + ("" if a.no_prefill else "---|")]
    for name, row in steps.items():
        cells = [f"{row[n]:.3f}" for n in a.lengths]
        if not a.no_prefill:
            cells += [f"{prefill[name][1]:.2f}", f"{a.prefill_len / prefill[name][1]:,.0f}",
                      via[name]]
        lines.append(f"| `{name}` | `{describe(name)}` | " + " | ".join(cells) + " |")
    lines.append(f"| dense floor | `softmax(q K^T) V`, {HEADS} heads of {DIM // HEADS} | "
                 + " | ".join(f"{floor[n]:.3f}" for n in a.lengths)
                 + ("" if a.no_prefill else " | | | ") + " |")
    if looped:
        lines += ["", f"Decode step inside one compiled loop of {LOOP_STEPS} steps, ms per step "
                  "(no Python or runtime dispatch between steps)", "",
                  "| mechanism | " + " | ".join(f"step {x}" for x in ls) + " |",
                  "|---|" + "---:|" * len(ls)]
        for name, row in looped.items():
            lines.append(f"| `{name}` | " + " | ".join(f"{row[n]:.3f}" for n in a.lengths)
                         + " |")
    if scoring:
        lines += ["", "Selectors: step = scoring pass + the rest (projections, gather, attention "
                  "over the selected keys), ms", "",
                  "| mechanism | " + " | ".join(f"scoring {x} | rest {x}" for x in ls) + " |",
                  "|---|" + "---:|" * (2 * len(ls))]
        for name, row in scoring.items():
            cells = [f"{row[n]:.3f} | {steps[name][n] - row[n]:.3f}" for n in a.lengths]
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    goals = {}
    top = max(a.lengths)
    for name in ("deepseek_sparse", "deepseek_sparse_top64", "minimax_sparse"):
        what = f"\nGoal: {name} step at {_len(GOAL_LENGTH)} >= {GOAL_SPEEDUP:g}x faster than standard: "
        if name not in steps or "standard" not in steps:
            lines.append(what + "not measured")
            continue
        per_call = steps["standard"][top] / steps[name][top]
        vs_floor = f"{floor[top] / steps[name][top]:.1f}x faster than the dense floor"
        # the verdict is on the step in a compiled loop when measured: a call's dispatch is not
        # the step's work, and the per-call time of a fast step swings with the process's history
        if name in looped and "standard" in looped:
            speedup = looped["standard"][top] / looped[name][top]
            detail = f"in a compiled loop; per call {per_call:.1f}x, {vs_floor}"
        else:
            speedup, detail = per_call, f"per call; {vs_floor}"
        if GOAL_LENGTH in a.lengths:
            goals[name] = speedup >= GOAL_SPEEDUP
            lines.append(what + f"{speedup:.1f}x -> {'PASS' if goals[name] else 'FAIL'} ({detail})")
        else:
            lines.append(what + f"not measured ({_len(GOAL_LENGTH)} is not among --lengths; at "
                         f"{_len(top)}: {speedup:.1f}x, {detail})")
    if pending:
        lines.append(f"\nNo decode=True yet (not timed): {', '.join(pending)}")
    lines += [f"\n{note}" for note in notes]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    lines.append(f"\npeak resident memory {peak:.2f} GiB")
    print("\n".join(lines))
    return {"steps": steps, "looped": looped, "scoring": scoring, "prefill": prefill, "via": via,
            "goals": goals, "floor": floor}


if __name__ == "__main__":
    main()
