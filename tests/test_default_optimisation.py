"""The suite compiles with LLVM's optimisations off (conftest.py). Selections are discrete: two
programs that rank the same scores must pick the same keys whatever the optimiser does to the
arithmetic around them. So every test marked ``selections`` runs here, in a fresh process at
XLA's default optimisation level (what users compile with); ``make test`` deselects them from
the main run (``-m "not selections"``), so each runs once. A plain ``pytest tests`` runs them
both ways."""

import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_selection_tests_pass_at_default_xla_optimisation():
    env = dict(os.environ, JAX_PLATFORMS="cpu", ATTNHUT_XLA_DEFAULT_OPT="1")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_backend_optimization_level" not in f)
    # only the files that hold marked tests: collecting the rest would import it all for nothing
    files = sorted(str(f) for f in TESTS.glob("test_*.py")
                   if "@pytest.mark.selections" in f.read_text() and f.name != Path(__file__).name)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", "-p",
         "no:xdist", "-m", "selections", *files],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=900)
    tail = done.stdout[-3000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed and int(passed.group(1)) >= 10, tail  # every marked test ran
    assert "failed" not in done.stdout.splitlines()[-1], tail
