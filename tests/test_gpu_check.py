"""`benchmarks/gpu_check.py` on a machine without a CUDA GPU: it says so and exits 0, having done nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HOME": str(tmp_path)}  # no GPU even where there is one
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("No CUDA GPU on this machine (torch ")
    assert "nothing to check here" in done.stdout
    assert not any(tmp_path.iterdir())  # no photos generated, no model saved
