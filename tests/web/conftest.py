"""Fixtures of the dashboard tests (helpers in ``web_support``)."""

import pytest
from test_hub_support import backend, db  # noqa: F401
from web_support import Site


@pytest.fixture
def site(db) -> Site:
    return Site(db)
