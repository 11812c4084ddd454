"""The README quickstart (examples/quickstart.py) runs: build, init, apply, and move weights to and
from attnhut."""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_runs(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["quickstart.py"])
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "round trip exact: True" in out
    err = float(out.split("max |flax - torch| = ")[1].split()[0])
    assert err < 1e-4
