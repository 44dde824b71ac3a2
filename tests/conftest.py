"""Test-wide settings."""

import os

# One BLAS thread per process, as bench/ measures hosts: the reference model's
# matrices are small, and a second OpenBLAS thread spinning for work takes the
# core that the test's other peers and processes need (set before numpy loads;
# the peers' subprocesses inherit it). Measured with two busy cores: the
# re-tokenizing continuation test used 20.9 s of CPU with it, 7.7 s without.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest
from hypothesis import settings

import docker_support

# Property tests assert behaviour, never speed: a loaded 2-core CI machine must
# not turn a slow example into a failure.
settings.register_profile("gpunexus", deadline=None)
settings.load_profile("gpunexus")


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected what will not run
def pytest_collection_modifyitems(items):
    """Run tests/test_docker_host.py right after tests/test_install_script.py.

    The install script's tests start the docker image builds that the other
    file's tests use (tests/docker_support.py): each keeps one core busy for
    minutes, so the builds are all but done when their tests come.
    """
    image_fixtures = {"host_image": "gpunexus-host", "hub_image": "gpunexus-hub"}
    docker_support.wanted_images.update(image for item in items for fixture, image in image_fixtures.items()
                                        if fixture in getattr(item, "fixturenames", ()))
    install = [i for i, item in enumerate(items) if item.path.name == "test_install_script.py"]
    if not install or not docker_support.wanted_images:
        return
    users = [item for item in items if item.path.name == "test_docker_host.py"]
    rest = [item for item in items if item.path.name != "test_docker_host.py"]
    after = rest.index(items[install[-1]]) + 1
    items[:] = rest[:after] + users + rest[after:]


def pytest_sessionfinish(session):
    docker_support.drop_pending_builds()  # a session that stopped early does not wait for image builds it no longer needs
