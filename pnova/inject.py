"""pnova-inject: damage an unmounted image on purpose, reproducibly.

For testing detection and repair (NOVA-Fortis's threat model): media errors
and stray writes.  Three kinds of damage, each aimed at one block chosen by
a seeded random generator from a target class:

* ``flip``: 1 to 8 bytes of the block (``--bytes``) each XORed with a non-zero
  random value, at random offsets in one 512-byte strip, or anywhere in the
  block with ``--spread``;
* ``poison``: one 512-byte sector of the block marked bad in the image's
  ``IMAGE.badblocks`` list, as a machine check would report it (the bytes
  are left as they are; reading them is what fails);
* ``zero``: a sector-aligned range of the block (``--length`` bytes) zeroed.

Targets: ``data`` (blocks of file contents and symlink targets: what data
protection covers), ``metadata`` (what is in use of it: superblocks, region
table, journals, the inode-table blocks of live inodes, their log pages and
per-core log arrays, the checksum and parity blocks of mapped data) or ``any``
block of the device.

Each event is printed as one line (or one JSON object with ``--json``), with
the file and byte range it hit for data, so that a test or a researcher knows
exactly what to expect.  The image must not be mounted, and it must be clean
(the tool reads its layout with a read-only mount).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import asdict, dataclass

from . import layout as L
from .engine import FileSystem
from .errors import CorruptImage, FsError
from .pmem import SECTOR, load_badblocks, save_badblocks
from .util import image_locked

KINDS = ("flip", "poison", "zero")
TARGETS = ("data", "metadata", "any")


@dataclass
class Event:
    """One piece of damage."""
    kind: str
    block: int
    offsets: list[int]          # byte offsets in the block (flip), or the start (zero, poison)
    length: int                 # bytes flipped, zeroed or poisoned
    what: str                   # 'data', or what metadata the block holds
    path: str | None = None     # data: the file
    file_offset: int | None = None   # data: file offset of the block's first byte

    def line(self) -> str:
        where = f"{self.what} block {self.block}"
        if self.path is not None:
            where += (f" ({self.path}, bytes {self.file_offset}.."
                      f"{self.file_offset + L.BLOCK - 1})")
        if self.kind == "flip":
            return f"flipped {self.length} byte(s) of {where} at {self.offsets}"
        verb = "poisoned" if self.kind == "poison" else "zeroed"
        return f"{verb} bytes {self.offsets[0]}..{self.offsets[0] + self.length - 1} of {where}"


def _walk(fs: FileSystem) -> list[tuple[str, int, dict[int, int]]]:
    """(path, ino, page index) of every file with data, from the root."""
    out = []
    todo = [("", L.ROOT_INO)]
    seen = {L.ROOT_INO}
    while todo:
        path, ino = todo.pop()
        try:
            listing = fs.readdir(ino)
        except FsError:
            continue                             # damaged already: nothing to aim at
        for name, child, _ in listing:
            if name in (b".", b"..") or child in seen:
                continue
            seen.add(child)
            try:
                inode = fs.get(child)
            except FsError:
                continue
            p = f"{path}/{name.decode(errors='replace')}"
            if inode.is_dir:
                todo.append((p, child))
            elif inode.pages:
                out.append((p, child, dict(inode.pages)))
    out.sort()
    return out


def _metadata(fs: FileSystem) -> list[tuple[int, str]]:
    """(block, what) of the metadata blocks in use: damage anywhere else in the
    metadata areas (free inode slots, records of free blocks) changes nothing."""
    sb = fs.sb
    out = [(0, "superblock"), (1, "region table"), (sb.total_blocks - 1, "superblock replica")]
    out += [(r.journal_block, "journal") for r in fs.regions]
    live = []
    for c in range(fs.ncpus):
        for ino in range(1 + c, 1 + c + fs.ncpus * sb.inodes_per_cpu, fs.ncpus):
            if fs.pm.read_u64(fs.inode_addr(ino) + L.I_STATE) == L.STATE_LIVE:
                live.append(ino)
                out.append((fs.inode_addr(ino) // L.BLOCK, "inode table"))
                if fs._rtables is not None:
                    out.append((fs._replica(fs.inode_addr(ino)) // L.BLOCK,
                                "inode table replica"))
    for ino in live:
        try:
            inode = fs.get(ino)
        except FsError:
            continue
        out += [(b, "log page") for b in inode.log_pages]
        for _h, _t, pages in inode.local.values():
            out += [(b, "log page (per-core log)") for b in pages]
        if inode.array:
            out.append((inode.array, "per-core log array"))
        if inode.array_twin:
            out.append((inode.array_twin, "per-core log array twin"))
        if inode.pages and fs.prot.csum:
            for b in inode.pages.values():
                c1, c2, par = fs.prot.records(b)
                out += [(c1 // L.BLOCK, "checksum records"), (c2 // L.BLOCK, "checksum replica")]
                if fs.prot.parity:
                    out.append((par // L.BLOCK, "parity strips"))
    return sorted(set(out))


def inject(image: str, *, kind: str = "flip", target: str = "data", count: int = 1,
           seed: int = 0, nbytes: int | None = None, spread: bool = False,
           length: int = SECTOR) -> list[Event]:
    """Damage ``image`` ``count`` times; return what was done.  Raises ValueError
    (one line) when the image cannot be damaged as asked."""
    if kind not in KINDS or target not in TARGETS:
        raise ValueError(f"kind must be one of {KINDS}, target one of {TARGETS}")
    if nbytes is not None and not 1 <= nbytes <= 8:
        raise ValueError("--bytes must be 1..8")
    if length < 1 or length % SECTOR or length > L.BLOCK:
        raise ValueError(f"--length must be a multiple of {SECTOR} up to {L.BLOCK}")
    if image_locked(image):
        raise ValueError(f"{image} is mounted; unmount it first")
    try:
        fs = FileSystem.mount(image, readonly=True)
    except CorruptImage as e:
        raise ValueError(f"cannot read the layout: {e}") from None
    try:
        files = _walk(fs) if target == "data" else []
        data = [(b, path, pg * L.BLOCK) for path, _ino, pages in files for pg, b in sorted(pages.items())]
        meta = _metadata(fs) if target == "metadata" else []
        total = fs.sb.total_blocks
    finally:
        fs.unmount()
    if target == "data" and not data:
        raise ValueError("the image holds no file data to damage")
    rng = random.Random(seed)
    events = []
    poison = load_badblocks(image)
    fd = os.open(image, os.O_RDWR)
    try:
        for _ in range(count):
            path = foff = None
            if target == "data":
                block, path, foff = rng.choice(data)
                what = "data"
            elif target == "metadata":
                block, what = rng.choice(meta)
            else:
                block, what = rng.randrange(total), "device"
            base = block * L.BLOCK
            if kind == "flip":
                n = nbytes or rng.randint(1, 8)
                if spread:
                    offs = sorted(rng.sample(range(L.BLOCK), n))
                else:
                    strip = rng.randrange(L.BLOCK // SECTOR) * SECTOR
                    offs = sorted(strip + o for o in rng.sample(range(SECTOR), n))
                for o in offs:
                    old = os.pread(fd, 1, base + o)[0]
                    os.pwrite(fd, bytes([old ^ rng.randint(1, 255)]), base + o)
                events.append(Event(kind, block, offs, n, what, path, foff))
            elif kind == "poison":
                o = rng.randrange(L.BLOCK // SECTOR) * SECTOR
                poison.add((base + o) // SECTOR)
                events.append(Event(kind, block, [o], SECTOR, what, path, foff))
            else:
                o = rng.randrange((L.BLOCK - length) // SECTOR + 1) * SECTOR
                os.pwrite(fd, bytes(length), base + o)
                events.append(Event(kind, block, [o], length, what, path, foff))
        os.fsync(fd)
    finally:
        os.close(fd)
    if kind == "poison":
        save_badblocks(image, poison)
    return events


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="pnova-inject",
        description="Damage an unmounted pnova image reproducibly (byte flips, poisoned "
                    "sectors, zeroed ranges), to test detection and repair.")
    ap.add_argument("image")
    ap.add_argument("--kind", choices=KINDS, default="flip", help="what damage (default flip)")
    ap.add_argument("--target", choices=TARGETS, default="data",
                    help="which blocks: file data, metadata, or any block (default data)")
    ap.add_argument("-n", "--count", type=int, default=1, help="damage events (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--bytes", type=int, default=None, dest="nbytes",
                    help="bytes per flip, 1..8 (default: random)")
    ap.add_argument("--spread", action="store_true",
                    help="flip bytes anywhere in the block, not within one 512-byte strip")
    ap.add_argument("--length", type=int, default=SECTOR,
                    help=f"bytes a zero event clears, a multiple of {SECTOR} (default {SECTOR})")
    ap.add_argument("--json", action="store_true", help="one JSON object per event")
    a = ap.parse_args(argv)
    try:
        events = inject(a.image, kind=a.kind, target=a.target, count=a.count, seed=a.seed,
                        nbytes=a.nbytes, spread=a.spread, length=a.length)
    except ValueError as e:
        print(f"pnova-inject: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"pnova-inject: {a.image}: {e.strerror}", file=sys.stderr)
        return 1
    for ev in events:
        print(json.dumps(asdict(ev)) if a.json else ev.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
