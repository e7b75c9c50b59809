"""Run a test module's kernel tests again in a child pytest under Triton's interpreter.

Triton decides at import time whether it interprets (TRITON_INTERPRET=1), so
the interpreted run needs its own process; the parent, and every other test
in the suite, keeps the ordinary Triton.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def run_kernel_tests(test_file: str, min_passed: int, selector: str = "kernel_") -> None:
    """Run the tests of ``test_file`` whose names contain ``selector`` interpreted; all must pass.

    ``min_passed`` guards against a selector that silently matches too few tests.
    """
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", test_file, "-q", "-x", "-p", "no:cacheprovider", "-k", selector],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= min_passed, proc.stdout[-2000:]  # every kernel test ran
