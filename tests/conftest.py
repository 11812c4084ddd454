import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's time is mostly XLA compiling hundreds of small programs that then run once or
# twice; LLVM's optimisation passes cost more than they save there (about 40% of the wall time).
# The HLO (and so what every test computes) is unchanged; results may differ from optimised code
# in the last bits only, far inside every tolerance. Any explicit level in XLA_FLAGS wins, and
# ATTNHUT_XLA_DEFAULT_OPT=1 keeps XLA's default (test_default_optimisation.py reruns the tests
# marked ``selections`` that way).
if (os.environ.get("ATTNHUT_XLA_DEFAULT_OPT") != "1"
        and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")):
    os.environ["XLA_FLAGS"] = " ".join(
        f for f in (os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0") if f)
