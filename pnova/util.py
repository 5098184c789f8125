"""Small helpers shared by the command-line tools and the mount."""
from __future__ import annotations

import fcntl
import os
import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(s: str) -> int:
    """'1G' -> 1073741824; accepts K/M/G/T with optional 'iB'/'B'; raises ValueError."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", s, re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {s!r} (try 1G, 512M)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def lock_image(path: str) -> int:
    """Take the exclusive 'mounted' lock on an image; return the fd holding it.

    Raises BlockingIOError if another process (a mount) holds it.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise BlockingIOError(f"{path} is in use (mounted?)") from None
    return fd


def image_locked(path: str) -> bool:
    """True if a mount holds the image."""
    try:
        fd = lock_image(path)
    except BlockingIOError:
        return True
    except OSError:
        return False
    os.close(fd)
    return False
