"""pnova: a NOVA/pNOVA-style persistent-memory filesystem in Python."""
from .engine import Attr, FileSystem, StatFs
from .errors import CorruptImage, FsError
from .layout import FORMAT_VERSION

__version__ = "0.1.0"
__all__ = ["Attr", "CorruptImage", "FileSystem", "FsError", "StatFs", "FORMAT_VERSION",
           "__version__"]
