"""mkfs.pnova as a user runs it."""
from __future__ import annotations

import os
import subprocess
import sys

from pnova import layout as L
from pnova.engine import FileSystem

MKFS = os.path.join(os.path.dirname(sys.executable), "mkfs.pnova")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MKFS, *args], capture_output=True, text=True, timeout=60)


def test_summary_line_and_mountable(tmp_path):
    img = str(tmp_path / "a.img")
    r = run("--size", "64M", "--numa-nodes", "2", "--cpus-per-node", "2", img)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert "\n" not in line
    for part in ("64.0 MiB", "2 NUMA node(s) x 2 CPU(s)", "inodes", f"format v{L.FORMAT_VERSION}"):
        assert part in line
    assert os.path.getsize(img) == 64 << 20
    fs = FileSystem.mount(img)
    assert fs.ncpus == 4 and fs.mount_path == "clean"
    fs.unmount()


def test_refuses_to_overwrite_without_force(tmp_path):
    img = str(tmp_path / "a.img")
    assert run("-s", "8M", img).returncode == 0
    fs = FileSystem.mount(img)
    fs.create(1, b"keep", 0o644)
    fs.unmount()
    r = run("-s", "8M", img)
    assert r.returncode == 1 and "use -f" in r.stderr and "Traceback" not in r.stderr
    fs = FileSystem.mount(img)
    assert fs.lookup(1, b"keep").size == 0       # nothing lost
    fs.unmount()
    assert run("-f", img).returncode == 0       # size taken from the existing file
    fs = FileSystem.mount(img)
    assert [n for n, _, _ in fs.readdir(1)] == [b".", b".."]
    fs.unmount()


def test_bad_input_gets_one_line(tmp_path):
    img = str(tmp_path / "b.img")
    for args in (["-s", "lots", img], ["-s", "16K", img], ["--numa-nodes", "0", "-s", "8M", img],
                 [img], ["-s", "8M", "--cpus-per-node", "65", img]):
        r = run(*args)
        assert r.returncode != 0
        assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr


def test_interrupted_reformat_leaves_no_stale_superblock(tmp_path, monkeypatch):
    """A re-format cut short must not leave the old replica describing old geometry."""
    import pytest

    import pnova.mkfs as mkfs
    from pnova.errors import CorruptImage

    img = str(tmp_path / "r.img")
    mkfs.format_device(img, 16 << 20, numa_nodes=1, cpus_per_node=4)

    def crash(*_a, **_k):
        raise RuntimeError("power lost before the superblock was written")

    monkeypatch.setattr(mkfs, "write_superblock", crash)
    with pytest.raises(RuntimeError):
        mkfs.format_device(img, 16 << 20, numa_nodes=1, cpus_per_node=2)
    with pytest.raises(CorruptImage, match="not a pnova filesystem"):
        FileSystem.mount(img)
