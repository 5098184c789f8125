"""Helpers shared by several test modules (fixtures live in conftest.py)."""
from __future__ import annotations

import os
import time
from collections.abc import Callable

from pnova.engine import FileSystem
from pnova_fsck.cli import main as fsck_main


def fsck(capsys, path: str, *opts: str) -> tuple[int, str]:
    """Run the fsck.pnova command on ``path``; (exit code, what it printed)."""
    capsys.readouterr()
    rc = fsck_main([*opts, path])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.out + cap.err
    return rc, cap.out + cap.err


def set_version(path: str, version: int) -> None:
    """Give an unmounted image another format version (both superblock copies,
    their CRC made good): how an image an older pnova wrote is made here."""
    import struct

    import crc32c

    from pnova import layout as L
    with open(path, "r+b") as f:
        raw = bytearray(f.read(L.SB_SIZE))
        struct.pack_into("<I", raw, 8, version)
        raw[L.SB_CRC_OFF:] = struct.pack("<I", crc32c.crc32c(bytes(raw[:L.SB_CRC_OFF])))
        for off in (0, os.path.getsize(path) - L.BLOCK):
            f.seek(off)
            f.write(raw)


def flip(path: str, off: int, mask: int = 0xFF) -> None:
    """XOR the byte at ``off`` of the file ``path`` with ``mask`` (damage on purpose)."""
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)[0]
        f.seek(off)
        f.write(bytes([b ^ mask]))


def fork_workers(fs: FileSystem, n: int, work: Callable[[int], None],
                 timeout: float = 120) -> None:
    """Fork ``n`` worker processes of a device prepared for workers; worker k runs
    ``work(k)``.  The parent refills the rings meanwhile (it is the designated
    refiller) and asserts that every worker finished without an exception."""
    pids = []
    for cpu in range(n):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                work(cpu)
                code = 0
            except BaseException as e:          # report, then exit non-zero
                os.write(2, f"worker {cpu}: {type(e).__name__}: {e}\n".encode())
            finally:
                os._exit(code)
        pids.append(pid)
    deadline = time.monotonic() + timeout
    failed = []
    for pid in pids:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                if os.waitstatus_to_exitcode(status) != 0:
                    failed.append(pid)
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
            fs.refill_rings()
            time.sleep(0.002)
    assert not failed, "a worker failed (see its message above)"
