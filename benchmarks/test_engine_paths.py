"""Engine paths timed with pytest-benchmark (``make bench``).

What fxmark's workloads cannot show apart, each in one process and on one
core, so that the figures move with the code and not with the machine's other
load: reading a directory's log whole (after a mount), a cache catching up
with another CPU's entries, and a namespace operation in a directory one CPU
uses alone or two CPUs take turns in (DESIGN 19.8, 20.1).  Compare figures
of one run (``--benchmark-compare`` against a saved run of the code before);
each benchmark checks the result it times.
"""
from __future__ import annotations

import itertools

import pytest

from pnova.engine import FileSystem
from pnova.mkfs import format_device

NAMES = 20_000               # names in the directory read whole
CATCH_UP = 500               # entries of another CPU a cache catches up with
ROOT = 1


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory):
    """An image whose directory ``d`` holds NAMES names: (path, ino of d)."""
    path = str(tmp_path_factory.mktemp("bench") / "big.img")
    format_device(path, 256 << 20, numa_nodes=1, cpus_per_node=2, inodes_per_cpu=1 << 15)
    fs = FileSystem.mount(path)
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    for k in range(NAMES):
        fs.create(d, b"file-%d" % k, 0o644)
        if k % 200 == 0:
            fs.refill_rings()
    fs.unmount()
    return path, d


def test_a_directory_read_whole_after_a_mount(benchmark, big_dir):
    """The first lookup in a directory after a mount: its whole log is walked,
    decoded and applied."""
    path, d = big_dir

    def mounted():
        return (FileSystem.mount(path),), {}

    def first_lookup(fs):
        try:
            return fs.lookup(d, b"file-7").ino
        finally:
            fs.unmount()

    assert benchmark.pedantic(first_lookup, setup=mounted, rounds=8) > 0


@pytest.fixture
def two_cpus(tmp_path):
    """CPU 0 and CPU 1 of one device in this process (as a mount's serving
    processes are), each with its own caches, and a directory ``d``."""
    path = str(tmp_path / "two.img")
    format_device(path, 256 << 20, numa_nodes=1, cpus_per_node=2, inodes_per_cpu=1 << 15)
    fs = FileSystem.mount(path)
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    fs.prepare_workers(workers=2)
    other = FileSystem.attach(fs, 1)
    yield fs, other, d
    fs.unmount()


def test_catching_up_with_another_cpus_entries(benchmark, two_cpus):
    """CPU 1 makes CATCH_UP names in ``d`` (not timed); CPU 0, whose cache of
    ``d`` has read everything before, then asks for its attributes, which
    catches its cache up in full (19.8) whatever the directory holds."""
    fs, other, d = two_cpus
    fs.readdir(d, 0)
    batch = itertools.count()

    def others_names():
        b = next(batch)
        for k in range(CATCH_UP):
            other.create(d, b"n-%d-%d" % (b, k), 0o644)
        other.refill_rings()
        return (), {}

    benchmark.pedantic(lambda: fs.getattr(d), setup=others_names, rounds=10)
    assert len(fs.readdir(d, 0)) == 10 * CATCH_UP + 2   # with . and ..


@pytest.mark.parametrize("shared", [False, True], ids=["one CPU's directory",
                                                       "two CPUs taking turns"])
def test_create_and_unlink_in_a_directory(benchmark, two_cpus, shared):
    """A create and an unlink of one name in ``d``: by CPU 0 alone (the
    directory is its own, 19.8), or by CPU 0 and CPU 1 taking turns (the
    directory shared: read share, name lock, versions, catching up)."""
    fs, other, d = two_cpus
    cpus = [fs, other] if shared else [fs]
    turn = itertools.count()

    def one_pair():
        k = next(turn)
        cpu = cpus[k % len(cpus)]
        name = b"t-%d" % k
        cpu.create(d, name, 0o644)
        cpu.unlink(d, name)
        if k % 200 == 0:
            fs.refill_rings()

    benchmark.pedantic(one_pair, rounds=2000, warmup_rounds=50)
    assert [n for n, *_ in fs.readdir(d, 0)] == [b".", b".."]
