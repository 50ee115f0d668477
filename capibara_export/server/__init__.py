"""The live server: a bundle's sharded programs served to live traffic across the slice it was
compiled for (docs/server.md). `SliceServer` and `ServerOptions` are its Python API."""

from .run import ServerOptions, SliceFailed, SliceServer

__all__ = ["ServerOptions", "SliceFailed", "SliceServer"]
