"""Keep the operator's resident memory close to what it actually holds.

The operator parses a steady stream of watch events and API responses of tens of kilobytes from
several threads and drops them at once. With glibc's defaults that inflates the resident set well
beyond the live data: each thread gets its own malloc arena that keeps what it freed, and after the
first large free the mmap threshold rises, so later large buffers come from the heap and fragment it.
`tune_allocator()` caps the arenas, pins the mmap threshold (large buffers get their own mappings and
go back to the system when freed) and `trim()` hands free heap pages back. On a libc without these
calls (musl) both do nothing.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("baton.operator")

# mallopt() parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

ARENAS = 2
MMAP_THRESHOLD = 128 * 1024
TRIM_THRESHOLD = 256 * 1024


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def tune_allocator() -> bool:
    """Apply the settings above; call it early, before worker threads start. True when applied."""
    libc = _libc()
    if libc is None:
        return False
    applied = all(libc.mallopt(param, value) == 1 for param, value in (
        (M_ARENA_MAX, ARENAS), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    if not applied:
        log.warning("could not tune the C allocator; memory use may run higher than needed")
    return applied


def trim() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
