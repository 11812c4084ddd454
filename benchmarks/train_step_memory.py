"""One training step of one sparse layer with its index loss on, at long context: peak memory and time.

    python benchmarks/train_step_memory.py                       # MSA, DSA, CSA at T = 8192, 32768
    python benchmarks/train_step_memory.py --lengths 8192 --mechs dsa --losses dense sparse
    .venv-parity/bin/python benchmarks/train_step_memory.py --attnhut --lengths 8192   # torch attnhut

The step is ``jax.jit(jax.value_and_grad(f, argnums=(0, 1)))`` of ``f(params, x) = mean(out ** 2) +
index_loss`` for one layer (batch 1, dim 512, 8 heads; MSA 2 kv groups, blocks 64, top 8 blocks;
DSA top_k 256; CSA its defaults), float32, ``index_loss=`` computed inside the module. Each case
runs in a fresh process, so its peak resident memory (``ru_maxrss``, compilation included) is its
own; the table also prints XLA's own estimate (arguments + outputs + temporaries of the compiled
step) and the step time (median of ``--repeats`` runs after the compiling one).

``--attnhut`` runs the same step in the PyTorch package (Python 3.11 environment): the layer with
``return_aux=True`` and attnhut's loss on the materialised (T, T) arrays (MSA's
``msa_index_aux_loss(**aux)``; DSA and CSA's ``dsa_index_aux_loss`` against the dense main
attention rebuilt from the layer's projections, as a user of attnhut has to), then ``backward``.
Its process gets an address-space limit (``--limit-gib``, default 22) so that a step that does
not fit reports so instead of taking the machine down.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

DIM, HEADS = 512, 8
MECHS = ("msa", "dsa", "csa")
LOSSES = {"msa": ("sparse",), "dsa": ("dense", "sparse"), "csa": ("dense", "sparse")}
ATTNHUT_LOSS = {"msa": "sparse", "dsa": "dense", "csa": "dense"}  # the loss attnhut defines


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_jax(mech: str, t: int, loss: str, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    import attnhut_jax as ah

    layer = {"msa": lambda: ah.MiniMaxSparseAttention(DIM, HEADS, 2, block_size=64, top_k=8),
             "dsa": lambda: ah.DeepSeekSparseAttention(DIM, HEADS, top_k=256),
             "csa": lambda: ah.CompressedSparseAttention(DIM, HEADS)}[mech]()
    params = jax.jit(layer.init)(jax.random.key(0), jnp.zeros((1, 64, DIM)))["params"]
    x = jax.random.normal(jax.random.key(1), (1, t, DIM), jnp.float32)

    def f(p, x):
        out, index_loss = layer.apply({"params": p}, x, index_loss=loss)
        return jnp.mean(jnp.square(out)) + index_loss

    base = _rss_gib()
    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(params, x).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla_gib = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                        + mem.temp_size_in_bytes) / 2**30
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        times.append(time.perf_counter() - t0)
    return {"impl": "attnhut_jax", "mech": mech, "T": t, "loss": loss,
            "step_s": statistics.median(times[1:] or times), "compile_s": compile_s,
            "xla_gib": xla_gib, "peak_rss_gib": _rss_gib(), "base_rss_gib": base}


def run_attnhut(mech: str, t: int, loss: str, repeats: int) -> dict:
    import attnhut
    import torch
    from attnhut import compressed as ahc

    torch.manual_seed(0)
    layer = {"msa": lambda: attnhut.MiniMaxSparseAttention(DIM, HEADS, 2, block_size=64, top_k=8),
             "dsa": lambda: attnhut.DeepSeekSparseAttention(DIM, HEADS, top_k=256),
             "csa": lambda: attnhut.CompressedSparseAttention(DIM, HEADS)}[mech]()
    x = torch.randn(1, t, DIM, requires_grad=True)

    def dense_weights(m, x):
        """The main attention over every visible key (DSA) / compressed entry (CSA): attnhut
        returns no such thing, so a user rebuilds it from the layer's projections."""
        b = x.shape[0]
        if mech == "dsa":
            q, k, _ = m.qkv(x).chunk(3, dim=-1)
            q, k = (a.view(b, t, HEADS, DIM // HEADS).transpose(1, 2) for a in (q, k))
            logits = q @ k.transpose(-1, -2) * (DIM // HEADS) ** -0.5
            mask = torch.ones(t, t, dtype=torch.bool).tril()
            return torch.softmax(logits.masked_fill(~mask, torch.finfo(logits.dtype).min), -1)
        comp = ahc._compress_overlap(m.kv_a(x), m.kv_b(x), m.z_a(x), m.z_b(x), m.bias_a,
                                     m.bias_b, m.rate)
        kv = ahc.rms_norm(comp, m.kv_norm)
        c = m.kv_dim
        q = ahc.rms_norm(m.q_up(m.q_down(x)).view(b, t, m.num_heads, c), m.q_norm).transpose(1, 2)
        logits = torch.einsum("bhnd,bsd->bhns", q, kv) * c ** -0.5
        visible = (torch.arange(kv.shape[1])[None, :] + 1) * m.rate <= torch.arange(t)[:, None]
        logits = logits.masked_fill(~visible, torch.finfo(logits.dtype).min)
        sink = m.sink.view(1, -1, 1, 1).expand(b, -1, t, 1)
        return torch.softmax(torch.cat([logits, sink], -1), -1)[..., :-1]

    def step():
        layer.zero_grad()
        x.grad = None
        out, aux = layer(x, return_aux=True)
        if mech == "msa":
            index_loss = attnhut.msa_index_aux_loss(**aux)
        else:
            index_loss = attnhut.dsa_index_aux_loss(aux["index_scores"], dense_weights(layer, x))
        (out.square().mean() + index_loss).backward()

    base = _rss_gib()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"impl": "attnhut (torch)", "mech": mech, "T": t, "loss": loss,
            "step_s": statistics.median(times[1:] or times), "compile_s": None, "xla_gib": None,
            "peak_rss_gib": _rss_gib(), "base_rss_gib": base}


def child(args: argparse.Namespace) -> None:
    mech, t, loss = args.one
    run = run_attnhut if args.attnhut else run_jax
    try:
        row = run(mech, int(t), loss, args.repeats)
    except (MemoryError, RuntimeError) as e:  # the address-space limit: the step does not fit
        row = {"impl": "attnhut (torch)" if args.attnhut else "attnhut_jax", "mech": mech,
               "T": int(t), "loss": loss, "error": f"{type(e).__name__}: {str(e)[:120]}",
               "peak_rss_gib": _rss_gib()}
    print("RESULT " + json.dumps(row), flush=True)


def parent(args: argparse.Namespace) -> list[dict]:
    rows = []
    for mech in args.mechs:
        losses = (ATTNHUT_LOSS[mech],) if args.attnhut else (args.losses or LOSSES[mech])
        for loss in losses:
            if loss not in LOSSES[mech]:
                continue
            for t in args.lengths:
                cmd = [sys.executable, __file__, "--one", mech, str(t), loss,
                       "--repeats", str(args.repeats)] + (["--attnhut"] if args.attnhut else [])
                limit = int(args.limit_gib * 2**30)

                def cap(limit=limit):
                    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

                proc = subprocess.run(cmd, capture_output=True, text=True,
                                      preexec_fn=cap if args.attnhut else None)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                row = json.loads(lines[-1][7:]) if lines else {
                    "mech": mech, "T": t, "loss": loss,
                    "error": f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}"}
                rows.append(row)
                print(_format(row), flush=True)
    return rows


def _format(r: dict) -> str:
    head = f"{r.get('impl', '?'):16s} {r['mech']:4s} {r['loss']:7s} T={r['T']:6d}"
    if "error" in r:
        return f"{head}  does not run: {r['error']}"
    xla = "" if r.get("xla_gib") is None else f"  XLA estimate {r['xla_gib']:6.2f} GiB"
    comp = "" if r.get("compile_s") is None else f"  compile {r['compile_s']:5.1f} s"
    return (f"{head}  peak RSS {r['peak_rss_gib']:6.2f} GiB (process baseline "
            f"{r['base_rss_gib']:.2f}){xla}  step {r['step_s']:7.2f} s{comp}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mechs", nargs="+", default=list(MECHS), choices=MECHS)
    p.add_argument("--lengths", nargs="+", type=int, default=[8192, 32768])
    p.add_argument("--losses", nargs="+", default=None, choices=("sparse", "dense"),
                   help="default: every loss the mechanism has")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--attnhut", action="store_true", help="the torch package's step instead")
    p.add_argument("--limit-gib", type=float, default=22.0)
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--one", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        child(args)
        return
    rows = parent(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
