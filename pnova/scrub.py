"""pnova-scrub: check a mounted pnova filesystem, its metadata and its file data,
repairing what can be.

No ioctl is needed.  For each file and directory the scrub first reads the
attribute ``trusted.pnova.scrub``, which the mount does not store: reading it
makes the mount read the inode's slot and logs again from the device (every
entry and page tail against its CRC; what the mount has cached may hide damage
done since) and, for a file, check every data block as fsck does (each strip
against its checksums, both checksum copies, the parity strip), repair what it
can and answer with counts (only root may read trusted.* attributes; as
another user this step is skipped and said so).  An inode slot that does not
read is restored from its replica then and there (a damaged replica rewritten
from the slot), and every log page is compared with its twin (format 8): a
log damaged in one copy is rewritten from what reads.  Metadata that does not
read back in either copy is reported by path, and so is a path the mount
answers EIO for (its serving process could not read the metadata to find
it): fsck.pnova repairs what it can with the image unmounted.
Then it reads every byte of each file with
O_DIRECT, so that the kernel's page cache answers nothing itself: every read
the mount serves checks the strips it returns, and bytes that cannot be
rebuilt answer EIO; the scrub reports them by path and byte range and goes
on past them.  Progress (bytes read of bytes to read) goes to stderr; the
exit status is 0 when everything read back, 1 when some data is lost, 2 on a
usage error (not a pnova mount).
"""
from __future__ import annotations

import argparse
import errno
import mmap
import os
import stat
import sys
import time

from .fuse_session import mounted_source
from .mount import is_pnova_type

CHUNK = 1 << 20
STRIP = 512
SCRUB_XATTR = "trusted.pnova.scrub"
COUNTS = ("blocks", "rebuilt", "copies", "parity", "lost", "meta", "slots", "logs")


def _n(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _scrub_attr(path: str) -> dict[str, int] | None:
    """The mount's check of one file's blocks, copies and parity (its counts),
    or None when this user may not ask (not root)."""
    try:
        raw = os.getxattr(path, SCRUB_XATTR, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EPERM, errno.EACCES):
            return None
        raise
    out = dict.fromkeys(COUNTS, 0)
    for part in raw.decode().split():
        key, _, value = part.partition("=")
        if key in out:
            out[key] = int(value)
    return out


def _files(top: str, dev: int, dirs_out: list[str],
           errors: list[OSError]) -> list[tuple[str, int]]:
    """(path, size) of every regular file under ``top`` on the same filesystem;
    the directories (``top`` included) go to ``dirs_out``, and what could not be
    listed or looked up (the error, with its ``filename``) to ``errors``."""
    out = []

    def here(path: str) -> bool:
        try:
            return os.lstat(path).st_dev == dev
        except OSError as e:
            errors.append(e)
            return False

    for root, dirs, names in os.walk(top, onerror=errors.append):
        dirs[:] = [d for d in dirs if here(os.path.join(root, d))]
        dirs_out.append(root)
        for n in names:
            p = os.path.join(root, n)
            try:
                st = os.lstat(p)
            except OSError as e:
                errors.append(e)
                continue
            if stat.S_ISREG(st.st_mode) and st.st_dev == dev:
                out.append((p, st.st_size))
    return out


def _read_all(path: str, size: int, buf: mmap.mmap, done: list[int],
              draw) -> list[tuple[int, int]]:
    """Read ``path`` to its end; return the byte ranges that answered EIO."""
    lost: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        off = 0
        while off < size:
            want = min(CHUNK, size - off)
            try:
                n = os.preadv(fd, [memoryview(buf)[:want]], off)
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                # a damaged strip: step over it (its range is reported) and go on
                end = min(size, (off // STRIP + 1) * STRIP)
                if lost and lost[-1][1] == off:
                    lost[-1] = (lost[-1][0], end)
                else:
                    lost.append((off, end))
                done[0] += end - off
                off = end
                continue
            if n == 0:
                break                    # the file shrank meanwhile
            off += n
            done[0] += n
            draw()
    finally:
        os.close(fd)
    return lost


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="pnova-scrub",
        description="Check every inode and read every file of a mounted pnova filesystem: "
                    "the mount reads each inode's logs again from the device, checks each "
                    "strip against its checksums and rebuilds damaged ones from parity; "
                    "report what cannot be read back.")
    ap.add_argument("mountpoint")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    a = ap.parse_args(argv)
    mnt = os.path.realpath(a.mountpoint)
    src = mounted_source(mnt)
    if src is None or not is_pnova_type(src[0]):
        print(f"pnova-scrub: {a.mountpoint} is not a pnova mount point", file=sys.stderr)
        return 2
    dirs: list[str] = []
    walk_errors: list[OSError] = []
    files = _files(mnt, os.stat(mnt).st_dev, dirs, walk_errors)
    total = sum(s for _, s in files)
    done = [0]
    last = [0.0]
    show = not a.quiet and sys.stderr.isatty()

    def draw(final: bool = False) -> None:
        if not show:
            return
        now = time.monotonic()
        if not final and now - last[0] < 0.2:
            return
        last[0] = now
        frac = done[0] / total if total else 1.0
        bar = "#" * int(30 * frac)
        sys.stderr.write(f"\rscrub [{bar:<30}] {100 * frac:5.1f}% of {total / 2**20:.1f} MiB")
        sys.stderr.flush()

    buf = mmap.mmap(-1, CHUNK)                   # page-aligned, as O_DIRECT wants
    damaged = unreadable = 0
    found = dict.fromkeys(COUNTS, 0)
    checked = True                               # copies and parity checked everywhere

    def meta_damaged(path: str) -> None:
        print(("\n" if show else "") + f"{path}: its metadata is damaged (the mount "
              "cannot read it back); unmount and run fsck.pnova")

    def failed(path: str, e: OSError, reported: bool) -> None:
        """A path the mount answered an error for.  EIO: the mount could not read
        its metadata (a serving process that had it cached would have answered
        the scrub's request instead), reported as such unless it already was."""
        nonlocal unreadable
        if e.errno == errno.EIO:
            if not reported:
                found["meta"] += 1
                meta_damaged(path)
            return
        print(f"\n{path}: {e.strerror}" if show else f"{path}: {e.strerror}")
        unreadable += 1

    for e in walk_errors:                        # not listed, or not looked up
        failed(str(e.filename), e, False)
    for path in dirs:
        try:
            counts = _scrub_attr(path)
        except OSError as e:
            failed(path, e, False)
            continue
        if counts is None:
            checked = False
        else:
            found["slots"] += counts["slots"]
            found["logs"] += counts["logs"]
            if counts["meta"]:
                found["meta"] += 1
                meta_damaged(path)
    for path, size in files:
        reported = False
        try:
            counts = _scrub_attr(path)
            if counts is None:
                checked = False
            else:
                for k, v in counts.items():
                    found[k] += v
                if counts["meta"]:
                    meta_damaged(path)
                    reported = True
            lost = _read_all(path, size, buf, done, draw)
        except OSError as e:
            failed(path, e, reported)
            continue
        if lost:
            damaged += 1
            ranges = ", ".join(f"{lo}..{hi - 1}" for lo, hi in lost)
            msg = f"{path}: bytes {ranges} are damaged beyond repair (EIO)"
            print(("\n" if show else "") + msg)
    draw(final=True)
    if show:
        sys.stderr.write("\n")
    print(f"{a.mountpoint}: {len(files)} files, {total} bytes read; "
          f"{damaged} with damage beyond repair"
          + (f", {unreadable} not readable" if unreadable else ""))
    if checked:
        # (an inode the walk met as EIO was asked for and failed: counted too,
        # whether or not a serving process had it cached)
        asked = len(files) + len(dirs) + sum(e.errno == errno.EIO for e in walk_errors)
        print(f"{a.mountpoint}: {_n(asked, 'inode')} read back from the "
              f"device; {found['meta']} with damaged metadata; "
              f"{_n(found['slots'], 'inode slot')} restored from the replica; "
              f"{_n(found['logs'], 'log')} damaged in one copy rewritten")
        ro = bool(os.statvfs(mnt).f_flag & os.ST_RDONLY)
        print(f"{a.mountpoint}: {_n(found['blocks'], 'data block')} checked; "
              f"{'rebuildable' if ro else 'rebuilt'} from parity: "
              f"{_n(found['rebuilt'], 'strip')}; {'bad (read-only mount: not rewritten)' if ro else 'rewritten'}: "
              f"{_n(found['copies'], 'checksum copy', 'checksum copies')}, "
              f"{_n(found['parity'], 'parity strip')}")
    else:
        print(f"{a.mountpoint}: checksum copies and parity not checked (only root may "
              "ask the mount to; reads checked the data)")
    return 1 if damaged or found["meta"] else 0


if __name__ == "__main__":
    sys.exit(main())
