"""Socket reads into a buffer that is kept, not allocated per read: `ReusedBufferProtocol`.

asyncio's default read path calls `sock.recv(256 KiB)` for each read, and CPython allocates the whole
256 KiB for every call before shrinking it to what arrived. That size is above glibc's mmap threshold,
so each read also costs an mmap, an mremap and a munmap (and a page fault per page touched): on the
benchmark machine about 20 us per read, several times the read itself. A `BufferedProtocol` reads with
`recv_into` into one buffer per thread instead, and the receiving protocol copies out what arrived.
"""

from __future__ import annotations

import asyncio
import threading

READ_BUFFER_BYTES = 256 * 1024  # what asyncio's own read path asks for

_local = threading.local()


def _read_buffer() -> memoryview:
    view: memoryview | None = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(READ_BUFFER_BYTES))
    return view


class ReusedBufferProtocol(asyncio.BufferedProtocol):
    """A protocol whose subclasses implement `data_received(data)` much as for `asyncio.Protocol`, except
    that `data` is a memoryview of the shared buffer, valid only during the call: copy what you keep
    (`bytearray += data`, `bytes(data)`).

    The buffer is shared by every connection of the thread: the transport fills it and calls
    `buffer_updated` right away, before anything else can read into it.
    """

    _read_view: memoryview | None = None

    def get_buffer(self, sizehint: int) -> memoryview:
        view = self._read_view
        if view is None:
            view = self._read_view = _read_buffer()  # the thread that reads is the event loop's
        return view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._read_view[:nbytes])  # type: ignore[index]

    def data_received(self, data: memoryview) -> None:
        raise NotImplementedError
