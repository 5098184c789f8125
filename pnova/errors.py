"""Errors the engine raises: an errno for the caller, never a traceback."""
from __future__ import annotations

import errno
import os


class FsError(Exception):
    """A filesystem operation failed with ``errno`` (what the user sees)."""

    def __init__(self, err: int, msg: str | None = None) -> None:
        super().__init__(err, msg or os.strerror(err))
        self.errno = err

    def __str__(self) -> str:
        return self.args[1]


class CorruptImage(Exception):
    """The image cannot be mounted; the message is one line for the user."""


ENOENT, EEXIST, ENOTDIR, EISDIR, ENOTEMPTY = (errno.ENOENT, errno.EEXIST, errno.ENOTDIR,
                                              errno.EISDIR, errno.ENOTEMPTY)
