"""The chaos suite's marker: ``pytest -m chaos`` runs only it, ``-m "not chaos"`` skips it."""


def pytest_configure(config):
    config.addinivalue_line("markers", "chaos: real processes under a seeded schedule of failures (gpunexus.chaos)")
