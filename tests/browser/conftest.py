"""Real-browser fixtures: the served app on a free loopback port, driven by the system Chromium."""
import os
from pathlib import Path

import pytest

from sparse_attn.ui.server import CHROMIUM, CHROMIUM_ARGS, serve


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.browser)
            item.add_marker(pytest.mark.timeout(180))


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"the browser tests need Chromium at {CHROMIUM} (tools/test.sh installs it)")
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": CHROMIUM_ARGS}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args):
    return {**browser_context_args, "viewport": {"width": 1500, "height": 1100}}


@pytest.fixture(scope="session")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("server") / "streamlit.log"


@pytest.fixture(scope="session")
def app_url(server_log):
    with serve(log_path=server_log) as url:
        yield url
    # Every browser test ran against this server: none of them may have raised inside it.
    text = server_log.read_text()
    assert "Traceback" not in text, text[-4000:]
