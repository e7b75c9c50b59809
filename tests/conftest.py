import os

import pytest
import torch

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# The app sets torch to one thread per process (sparse_attn/ui/threads.py); the tests run the app in
# this process (AppTest) and serve it from children, and keep torch's own count (0) unless told otherwise.
os.environ.setdefault("SPARSE_ATTN_TORCH_THREADS", "0")


@pytest.fixture(autouse=True)
def _seeded():
    # Every test starts from the same global RNG state, so a failure reproduces.
    torch.manual_seed(0)


def pytest_sessionfinish(session, exitstatus):
    # In CI a skipped test is a test that did not run: fail the run instead of
    # letting a missing browser or model pass silently.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if IN_CI and skipped and exitstatus == 0:
        reporter.write_line(f"CI: {skipped} test(s) skipped; skips are failures in CI", red=True)
        session.exitstatus = 1
