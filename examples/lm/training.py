"""The training loop: one jit-compiled step, evaluation, checkpoints and a progress line.

Training is one jit-compiled step (optax AdamW, warmup + cosine decay, global-norm clipping); the
selectors' auxiliary losses (``model.py``) join the task loss weighted by ``aux_weight``.

Checkpoints (``ckpt_dir``) are written with orbax every ``ckpt_every`` steps and at the end; a
rerun with the same directory restores parameters, optimiser state, step and metric history, and
continues with the batches it would have seen (batch ``s`` is a function of (seed, s)).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .config import WITH_AUX_LOSS, Config
from .data import Batch, Data, recall_batch
from .model import LM, kv_cache_bytes_per_token
from .sharding import make_mesh, param_shardings, parse_mesh, state_shardings

Array = jax.Array
PyTree = Any


def schedule(cfg: Config) -> optax.Schedule:
    decay = max(cfg.steps, cfg.warmup + 1)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, decay,
                                              end_value=cfg.lr * cfg.end_lr_ratio)


def optimizer(cfg: Config) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW; no weight decay on vectors (norms, biases, lambdas)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip),
        optax.adamw(schedule(cfg), b1=0.9, b2=0.95, weight_decay=cfg.weight_decay,
                    mask=decay_mask))


def loss_fn(model: LM, cfg: Config, params: PyTree, batch: Batch, with_aux: bool):
    """(task loss + aux_weight * index aux loss, metrics). Task loss: weighted next-token CE."""
    logits, aux = model.apply({"params": params}, batch["tokens"], with_aux=with_aux,
                              segment_ids=batch.get("segment_ids"),
                              positions=batch.get("positions"))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    w = batch["weights"]
    denom = jnp.maximum(w.sum(), 1.0)
    task = (ce * w).sum() / denom
    correct = ((jnp.argmax(logits, -1) == batch["targets"]) * w).sum()
    return task + cfg.aux_weight * aux, {"loss": task, "aux": aux, "acc": correct / denom}


def make_train_step(model: LM, cfg: Config, tx: optax.GradientTransformation):
    """The un-jitted train step ``(state, batch) -> (state, metrics)``."""
    with_aux = cfg.aux_weight > 0 and cfg.attn in WITH_AUX_LOSS
    lr = schedule(cfg)

    def step(state, batch):
        grad_fn = jax.value_and_grad(lambda p: loss_fn(model, cfg, p, batch, with_aux),
                                     has_aux=True)
        (_, metrics), grads = grad_fn(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=lr(state["step"]))
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return step


def make_eval_step(model: LM, cfg: Config):
    def evaluate(params, batch):
        logits, _ = model.apply({"params": params}, batch["tokens"],
                                segment_ids=batch.get("segment_ids"),
                                positions=batch.get("positions"))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        w = batch["weights"]
        correct = (jnp.argmax(logits, -1) == batch["targets"]) * w
        return {"loss_sum": (ce * w).sum(), "correct": correct.sum(), "count": w.sum()}

    return evaluate


@dataclasses.dataclass
class Trainer:
    """Model, optimiser, mesh, shardings and the jitted functions of one configuration."""

    cfg: Config
    mesh: Mesh
    model: LM
    tx: optax.GradientTransformation
    state_sharding: PyTree
    batch_sharding: NamedSharding
    init_state: Callable[[], PyTree]
    train_step: Callable[[PyTree, Batch], tuple[PyTree, dict]]
    eval_step: Callable[[PyTree, Batch], dict]
    recall_batch: Callable[[Array], Batch]
    replicated_params: list[str]

    @classmethod
    def build(cls, cfg: Config, mesh: Mesh) -> Trainer:
        """The trainer for ``cfg`` on ``mesh``; configurations that differ only in bookkeeping
        (checkpoints, metrics file, eval cadence, progress) share one compiled trainer."""
        cfg.validate()
        return _build_trainer(dataclasses.replace(cfg, **BOOKKEEPING), mesh)

    @classmethod
    def _build(cls, cfg: Config, mesh: Mesh) -> Trainer:
        data_size = mesh.shape["data"]
        if cfg.batch_size % data_size:
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the mesh's "
                             f"data={data_size}")
        model, tx = LM(cfg), optimizer(cfg)
        dummy = jnp.zeros((1, cfg.seq_len), jnp.int32)
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy)["params"])
        params_sh, fallback = param_shardings(boxed, mesh)

        def init_fn():
            params = nn.meta.unbox(model.init(jax.random.key(cfg.seed), dummy)["params"])
            return {"step": jnp.zeros((), jnp.int32), "params": params,
                    "opt_state": tx.init(params)}

        state_sh = state_shardings(jax.eval_shape(init_fn), params_sh, mesh)
        batch_sh = NamedSharding(mesh, P("data"))
        rep = NamedSharding(mesh, P())
        init_state = jax.jit(init_fn, out_shardings=state_sh)
        train_step = jax.jit(make_train_step(model, cfg, tx), in_shardings=(state_sh, batch_sh),
                             out_shardings=(state_sh, rep), donate_argnums=0)
        eval_step = jax.jit(make_eval_step(model, cfg),
                            in_shardings=(state_sh["params"], batch_sh), out_shardings=rep)
        recall = jax.jit(lambda key: recall_batch(key, cfg, cfg.batch_size), out_shardings=batch_sh)
        return cls(cfg, mesh, model, tx, state_sh, batch_sh, init_state, train_step, eval_step,
                   recall, fallback)

    def evaluate(self, params: PyTree, batches: list[Batch]) -> dict[str, float]:
        tot = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        for b in batches:
            for k, v in jax.device_get(self.eval_step(params, b)).items():
                tot[k] += float(v)
        n = max(tot["count"], 1.0)
        return {"loss": tot["loss_sum"] / n, "acc": tot["correct"] / n}


BOOKKEEPING = dict(eval_every=1, eval_batches=1, ckpt_dir=None, ckpt_every=1, mesh=None,
                   metrics_out=None, progress=False)


@functools.lru_cache(maxsize=16)
def _build_trainer(cfg: Config, mesh: Mesh) -> Trainer:
    return Trainer._build(cfg, mesh)


# ----------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """orbax CheckpointManager for the train state (sharded arrays) plus a JSON of metrics."""

    def __init__(self, directory: str | Path, every: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=2,
                                               create=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                             item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: PyTree, meta: dict, force: bool = False) -> bool:
        ocp = self.ocp
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=self.ocp.args.Composite(
            meta=self.ocp.args.JsonRestore()))["meta"]

    def restore_state(self, step: int, abstract_state: PyTree) -> PyTree:
        """The train state, each array restored straight into its sharding in ``abstract_state``."""
        return self.manager.restore(step, args=self.ocp.args.Composite(
            state=self.ocp.args.StandardRestore(abstract_state)))["state"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _abstract(state_sharding: PyTree, shapes: PyTree) -> PyTree:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, state_sharding)


def _check_resumable(cfg: Config, saved: dict) -> None:
    diff = {f: (saved.get(f), getattr(cfg, f)) for f in Config.MODEL_FIELDS
            if saved.get(f) != getattr(cfg, f)}
    if diff:
        named = ", ".join(f"{f}: checkpoint {a!r} vs now {b!r}" for f, (a, b) in diff.items())
        raise ValueError(f"--ckpt-dir holds a run with a different configuration ({named})")


# ----------------------------------------------------------------------------- progress


class Progress:
    """One carriage-return status line on a terminal; a line every 10% elsewhere."""

    def __init__(self, total: int, label: str, enabled: bool, stream=sys.stderr):
        self.total, self.label, self.enabled, self.stream = total, label, enabled, stream
        self.tty = stream.isatty()
        self.last_pct = -1

    def update(self, step: int, loss: float, acc: float, tok_s: float) -> None:
        if not self.enabled:
            return
        frac = step / max(self.total, 1)
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        line = (f"{self.label} [{bar}] {step}/{self.total} loss {loss:.4f} acc {acc:.3f} "
                f"{tok_s:,.0f} tok/s")
        if self.tty:
            self.stream.write("\r" + line)
        elif int(10 * frac) != self.last_pct or step == self.total:
            self.last_pct = int(10 * frac)
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------- the run


def train(cfg: Config, mesh: Mesh | None = None, log: Callable[[str], None] = print,
          stop_after: int | None = None) -> dict:
    """Run ``cfg`` and return the metrics dict (also written to ``cfg.metrics_out``).

    ``stop_after``: leave after this many steps of this call (saving a checkpoint there), as a
    preempted job would; a later call with the same ``ckpt_dir`` goes on from that step.
    """
    cfg.validate()
    if mesh is None:
        mesh = make_mesh(parse_mesh(cfg.mesh, jax.device_count()))
    trainer = Trainer.build(cfg, mesh)
    data = Data(cfg, trainer)
    eval_set = data.eval_batches()
    tokens_per_step = cfg.batch_size * cfg.seq_len
    log(f"attn={cfg.attn} mesh={dict(mesh.shape)} devices={mesh.size} "
        f"({jax.devices()[0].platform}) vocab={cfg.vocab} "
        f"kv-cache {kv_cache_bytes_per_token(cfg):.1f} B/token (bf16)")
    if trainer.replicated_params:
        log("replicated (mesh axis does not divide): " + "; ".join(trainer.replicated_params))

    ckpt = Checkpoints(cfg.ckpt_dir, cfg.ckpt_every) if cfg.ckpt_dir else None
    meta: dict[str, Any] = {"config": dataclasses.asdict(cfg), "history": [], "evals": []}
    latest = ckpt.latest_step() if ckpt else None
    if latest is not None:
        saved = ckpt.restore_meta(latest)
        _check_resumable(cfg, saved["config"])  # before touching arrays of another shape
        abstract = _abstract(trainer.state_sharding, jax.eval_shape(trainer.init_state))
        state = ckpt.restore_state(latest, abstract)
        meta = dict(saved, config=dataclasses.asdict(cfg))
        log(f"resumed from {cfg.ckpt_dir} at step {latest}")
    else:
        state = trainer.init_state()
        n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
        meta["num_params"] = int(n_params)
        first = trainer.evaluate(state["params"], eval_set)
        meta["evals"].append({"step": 0, **first})
        log(f"{n_params:,} parameters; step 0 eval loss {first['loss']:.4f} acc {first['acc']:.3f}")

    start = int(jax.device_get(state["step"]))
    bar = Progress(cfg.steps, cfg.attn, cfg.progress)
    timed_tokens, timed_seconds = 0, 0.0
    stop = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    for step in range(start, stop):
        batch = data.train_batch(step)
        t0 = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        dt = time.perf_counter() - t0
        if step > start:  # the first step of a process includes compilation
            timed_tokens += tokens_per_step
            timed_seconds += dt
        meta["history"].append({"step": step, **metrics})
        done = step + 1
        bar.update(done, metrics["loss"], metrics["acc"],
                   timed_tokens / timed_seconds if timed_seconds else 0.0)
        if done % cfg.eval_every == 0 or done == stop:
            ev = trainer.evaluate(state["params"], eval_set)
            meta["evals"].append({"step": done, **ev})
            (bar.note if cfg.progress else log)(
                f"step {done}: eval loss {ev['loss']:.4f} acc {ev['acc']:.3f}")
        if ckpt is not None:
            ckpt.save(done, state, _json_meta(meta), force=done == stop)
    bar.close()
    if ckpt is not None:
        ckpt.close()

    evals = meta["evals"]
    final = evals[-1]
    result = {
        "attn": cfg.attn,
        "task": "text" if cfg.text else "mqar",
        "initial_loss": evals[0]["loss"],
        "final_loss": final["loss"],
        "initial_acc": evals[0]["acc"],
        "final_acc": final["acc"],
        "chance_acc": None if cfg.text else 1.0 / cfg.num_values,
        "steps": cfg.steps,
        "devices": mesh.size,
        "mesh": dict(mesh.shape),
        "tokens_per_sec": timed_tokens / timed_seconds if timed_seconds else None,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg),
        "num_params": meta.get("num_params"),
        "train_loss": [h["loss"] for h in meta["history"]],
        "evals": evals,
        "config": dataclasses.asdict(cfg),
    }
    if cfg.steps > start or latest is None:
        log(f"eval loss {result['initial_loss']:.4f} -> {result['final_loss']:.4f}, "
            f"accuracy {result['initial_acc']:.3f} -> {result['final_acc']:.3f}"
            + ("" if cfg.text else f" (chance {1.0 / cfg.num_values:.3f})"))
    result["state"] = state
    result["trainer"], result["cfg"] = trainer, cfg
    if cfg.metrics_out:
        Path(cfg.metrics_out).write_text(json.dumps(_json_meta(
            {k: v for k, v in result.items() if k not in ("state", "trainer", "cfg")}), indent=1))
    return result


def _json_meta(meta: dict) -> dict:
    return json.loads(json.dumps(meta, default=float))
