"""Walks over a jaxpr and every jaxpr nested in it (control-flow branches and bodies, custom-vjp
rules, Pallas kernel bodies): for the "no (T, T) array" and "precision reaches every product"
checks."""

from __future__ import annotations


def jaxpr_eqns(jaxpr):
    """Every equation, nested ones included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = sub if hasattr(sub, "eqns") else getattr(sub, "jaxpr", None)
                if inner is not None:
                    yield from jaxpr_eqns(inner if hasattr(inner, "eqns") else inner.jaxpr)


def jaxpr_shapes(jaxpr):
    """Every array shape an equation reads or writes."""
    for eqn in jaxpr_eqns(jaxpr):
        for var in (*eqn.invars, *eqn.outvars):
            if hasattr(var, "aval") and hasattr(var.aval, "shape"):
                yield tuple(var.aval.shape)
