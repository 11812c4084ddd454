import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["quickstart.py"])
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "round trip exact: True" in out
    err = float(out.split("max |flax - torch| = ")[1].split()[0])
    assert err < 1e-4


def test_attnhut_jax_never_imports_torch():
    import subprocess

    code = "import sys, attnhut_jax, pallas_kernels; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
