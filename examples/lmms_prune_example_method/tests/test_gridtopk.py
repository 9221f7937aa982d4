"""``lmms-prune check-method gridtopk`` passes (run from this folder after ``pip install -e .``)."""

import subprocess
import sys


def test_check_method_passes():
    done = subprocess.run([sys.executable, "-m", "lmms_prune.cli.main", "check-method", "gridtopk",
                           "--families", "internvl_qwen2,qwen2_5_vl"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
