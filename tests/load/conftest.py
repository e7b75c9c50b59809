"""Fixtures for the classroom tests: the browser suite's own server and Chromium fixtures, plus a faulty server."""
from pathlib import Path

import pytest

from sparse_attn.ui.errors import FAULT_ENV
from sparse_attn.ui.server import serve
from tests.browser.conftest import app_url, browser_context_args, browser_type_launch_args, server_log  # noqa: F401


def pytest_configure(config):
    config.addinivalue_line("markers", "load: many browser sessions, hostile input and faults against one served app")


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.browser)
            item.add_marker(pytest.mark.load)
            item.add_marker(pytest.mark.timeout(300))


@pytest.fixture(scope="module")
def faulty_app(tmp_path_factory):
    """(url, log path) of a second server whose maps panel raises midway through its computation."""
    log = tmp_path_factory.mktemp("faulty") / "streamlit.log"
    with serve(log_path=log, env={FAULT_ENV: "maps"}) as url:
        yield url, log
