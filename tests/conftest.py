"""Shared fixtures: a freshly formatted small image and a mounted engine on it."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from pnova.engine import FileSystem
from pnova.fuse_session import URING_PARAMETER
from pnova.mkfs import format_device

settings.register_profile("ci", deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", deadline=None, max_examples=500,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def fuse_over_io_uring():
    """FUSE over io_uring switched on for the whole run, where the kernel has it
    and the tests run as root, as `make run` and `make test` leave it: a mount's
    default (io_uring=auto) then takes its requests that way, and the tests of
    the /dev/fuse path say io_uring=off.  Put back as it was afterwards."""
    try:
        with open(URING_PARAMETER, encoding="ascii") as f:
            before = f.read().strip()
    except OSError:
        yield                                    # no such kernel: nothing to switch
        return
    switched = False
    if before != "Y" and os.geteuid() == 0:
        with open(URING_PARAMETER, "w", encoding="ascii") as f:
            f.write("Y")
        switched = True
    try:
        yield
    finally:
        if switched:
            with open(URING_PARAMETER, "w", encoding="ascii") as f:
                f.write(before)


@pytest.fixture
def image(tmp_path) -> str:
    """Path of a freshly formatted 32 MiB image with 2 CPUs on 1 node."""
    path = str(tmp_path / "pnova.img")
    format_device(path, 32 << 20, numa_nodes=1, cpus_per_node=2)
    return path


@pytest.fixture
def img(tmp_path) -> str:
    """Path of a freshly formatted 8 MiB image with 2 CPUs on 1 node."""
    path = str(tmp_path / "t.img")
    format_device(path, 8 << 20, numa_nodes=1, cpus_per_node=2)
    return path


@pytest.fixture
def fs(image):
    """The engine mounted on ``image``; unmounted cleanly afterwards if still mounted."""
    f = FileSystem.mount(image)
    yield f
    if f.pm is not None:
        f.unmount()


@pytest.fixture
def shm_dir():
    """A fresh directory in /dev/shm (tmpfs): an image there is one in memory
    (no syncs to a disk), whatever file system holds the test's own tmp_path."""
    d = tempfile.mkdtemp(prefix="pnova-test-", dir="/dev/shm")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)
