"""Fixtures of the dashboard tests (helpers in ``web_support``)."""

import os

import pytest
from test_hub_support import backend, db  # noqa: F401
from web_support import SCREENSHOTS, Site


@pytest.fixture
def site(db) -> Site:
    return Site(db)


def pytest_terminal_summary(terminalreporter) -> None:
    """Name every screenshot the browser tests took, so a run's output says where to look."""
    for folder in SCREENSHOTS:
        terminalreporter.write_sep("-", f"dashboard screenshots in {folder}")
        for name in sorted(os.listdir(folder)):
            terminalreporter.write_line(os.path.join(folder, name))
