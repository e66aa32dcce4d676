"""Every example script runs end to end on a tiny model."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quantize_and_evaluate(tiny_model, tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "quantize_and_evaluate.py"), "--model", str(tiny_model("qwen2")),
                           "--out", str(tmp_path / "out"), "--bits", "4", "--group-size", "32", "--quick"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "output shape" in proc.stdout and "ppl" in proc.stdout
