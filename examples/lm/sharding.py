"""Mesh and parameter placement.

``--mesh data=D,model=M`` (D * M = number of devices) builds a ``jax.sharding.Mesh``. The batch is
split over ``data``; every parameter is placed by the logical axis names the modules declare,
through ``RULES`` (heads, kv heads, fused qkv, MLP, vocabulary, indexer heads on ``model``, the
rest replicated), so the same script runs on one CPU or a multi-GPU host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any

MESH_AXES = ("data", "model")

# Logical axis -> mesh axis. Axes not listed (and axes whose size the mesh axis does not divide)
# are replicated. Order matters only when two logical axes of one array ask for the same mesh axis.
RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("qkv", "model"),
    ("mlp", "model"),
    ("index_heads", "model"),
    ("vocab", "model"),
    ("embed", None),
    ("kv", None),
    ("latent", None),
    ("index", None),
    ("head_dim", None),
    ("rate", None),
    ("gru", None),
    ("scale", None),
)


def parse_mesh(spec: str | None, num_devices: int) -> dict[str, int]:
    """``"data=4,model=2"`` -> {"data": 4, "model": 2}; missing axes are 1, no spec is all-data.

    Raises ``ValueError`` naming the values for an unknown axis, a malformed or repeated entry, a
    size below 1, or sizes whose product is not ``num_devices``.
    """
    if not spec:
        return {"data": num_devices, "model": 1}
    sizes: dict[str, int] = {}
    for item in spec.split(","):
        name, eq, value = item.strip().partition("=")
        if not eq or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh {spec!r}: entry {item!r} is not AXIS=SIZE "
                             f"(for example data=4,model=2)")
        name = name.strip()
        if name not in MESH_AXES:
            raise ValueError(f"--mesh {spec!r}: unknown axis {name!r}; axes are {MESH_AXES}")
        if name in sizes:
            raise ValueError(f"--mesh {spec!r}: axis {name!r} is given twice")
        sizes[name] = int(value)
        if sizes[name] < 1:
            raise ValueError(f"--mesh {spec!r}: axis {name}={sizes[name]} must be >= 1")
    sizes = {a: sizes.get(a, 1) for a in MESH_AXES}
    prod = math.prod(sizes.values())
    if prod != num_devices:
        raise ValueError(f"--mesh {spec!r}: axis sizes {sizes} multiply to {prod}, but there are "
                         f"{num_devices} devices")
    return sizes


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over ``devices`` (default: all), both axes in automatic mode."""
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(sizes[a] for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(shape)} devices, got {len(devices)}")
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def param_partition_specs(boxed: PyTree, mesh_shape: dict[str, int], rules=RULES
                          ) -> tuple[PyTree, list[str]]:
    """Mesh ``PartitionSpec`` per parameter from the logical axes it was declared with, and the
    parameters that had a dimension replicated because the mesh axis size does not divide it."""
    logical = nn.get_partition_spec(boxed)
    shapes = nn.meta.unbox(boxed)
    fallback: list[str] = []

    def one(path, spec, leaf):
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if spec else P()
        axes = list(mesh_spec) + [None] * (len(leaf.shape) - len(mesh_spec))
        for i, ax in enumerate(axes):
            if ax is not None and leaf.shape[i] % mesh_shape[ax]:
                axes[i] = None
                fallback.append(f"{jax.tree_util.keystr(path)} dim {i} ({leaf.shape[i]} % {ax}="
                                f"{mesh_shape[ax]})")
        return P(*axes)

    specs = jax.tree_util.tree_map_with_path(one, logical, shapes,
                                             is_leaf=lambda s: isinstance(s, P))
    return specs, fallback


def param_shardings(boxed: PyTree, mesh: Mesh, rules=RULES) -> tuple[PyTree, list[str]]:
    """``param_partition_specs`` as ``NamedSharding``s on ``mesh``."""
    specs, fallback = param_partition_specs(boxed, dict(mesh.shape), rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda s: isinstance(s, P)), fallback


def _dict_path(path) -> tuple[str, ...]:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(abstract_state: PyTree, params_sh: PyTree, mesh: Mesh) -> PyTree:
    """Shardings for the whole train state: optimiser moments follow their parameter (matched by
    the parameter's dict path and shape), everything else (counters, step) is replicated."""
    by_path = {_dict_path(p): s for p, s in jax.tree_util.tree_leaves_with_path(params_sh)}
    shapes = {_dict_path(p): x.shape
              for p, x in jax.tree_util.tree_leaves_with_path(abstract_state["params"])}
    rep = NamedSharding(mesh, P())

    def one(path, leaf):
        key = _dict_path(path)[1:]  # drop "params" / "opt_state"
        return by_path[key] if key in by_path and shapes[key] == leaf.shape else rep

    return jax.tree_util.tree_map_with_path(one, abstract_state)
