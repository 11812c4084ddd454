import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's time is mostly XLA compiling hundreds of small programs that then run once or
# twice; LLVM's optimisation passes cost more than they save there (about 40% of the wall time).
# The HLO (and so what every test computes) is unchanged; results may differ from optimised code
# in the last bits only, far inside every tolerance. Any explicit level in XLA_FLAGS wins, and
# ATTNHUT_XLA_DEFAULT_OPT=1 keeps XLA's default (test_default_optimisation.py runs the tests
# marked ``selections`` that way).
if (os.environ.get("ATTNHUT_XLA_DEFAULT_OPT") != "1"
        and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")):
    os.environ["XLA_FLAGS"] = " ".join(
        f for f in (os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0") if f)


# Programs compiled again in one run (every test file drops JAX's in-memory caches, below; the
# two xdist workers and test_default_optimisation's process compile many of the same small
# programs: eager ops, inits) load from an on-disk compilation cache that lives for this run
# only: a fresh directory, made by the first process (pytest's, before xdist starts its workers,
# which inherit it) and removed when that process exits. The cache key holds the XLA flags
# (the optimisation level among them), so each level keeps its own programs. About 8% of the
# CPU time of the behaviour, interop, mechanisms, registry and dense decode tests.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="attnhut-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import gc  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test file. A worker process compiles over a
    thousand programs; XLA:CPU maps each one's code into memory, and kept alive by the jit caches
    they pushed the process past the kernel's limit on memory mappings (vm.max_map_count, 65530
    here), where the next compilation segfaulted."""
    yield
    jax = sys.modules.get("jax")
    if jax is not None:
        jax.clear_caches()
        gc.collect()
