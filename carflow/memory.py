"""glibc's allocator, the one place carflow reaches it (through ``ctypes``; no import of
pyarrow or numpy here, so :mod:`flows` can use it before pyarrow reads its settings)."""

from __future__ import annotations

from typing import Any


def glibc() -> Any | None:
    """The C library when it is glibc (Linux), else None (macOS, musl)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Give the pages of freed buffers back to the OS (glibc ``malloc_trim``) between the
    steps of a reduce. Its input tables are freed in pieces (a shard's chunk of each
    column) and its outputs are allocated whole, so freed memory is seldom reused and
    glibc keeps it: the merge of 100k results onto the manifest freed 48 MB of Arrow
    buffers and still grew RSS by 65 MB (``bench/memory.py``). A no-op without glibc."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
