"""Every array shape a jaxpr builds, nested jaxprs included (control flow branches and bodies,
custom-vjp rules, Pallas kernel bodies): for the "no (T, T) array" checks."""

from __future__ import annotations


def jaxpr_shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for var in (*eqn.invars, *eqn.outvars):
            if hasattr(var, "aval") and hasattr(var.aval, "shape"):
                yield tuple(var.aval.shape)
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = sub if hasattr(sub, "eqns") else getattr(sub, "jaxpr", None)
                if inner is not None:
                    yield from jaxpr_shapes(inner if hasattr(inner, "eqns") else inner.jaxpr)
