import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_attnhut_jax_never_imports_torch():
    import subprocess

    code = "import sys, attnhut_jax, pallas_kernels; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
