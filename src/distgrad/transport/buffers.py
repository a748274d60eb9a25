"""Reusable message buffers, so a round trip allocates (and page-faults) nothing new.

A 19 MB message written into a freshly allocated buffer costs the kernel a page fault
per 4 KiB page and a pass to zero it — as much as the copy itself. :class:`BufferPool`
keeps a few buffers and hands one out again only when **nothing else refers to it**: no
numpy view, tensor, memoryview or queued send holds it (CPython's reference count of the
buffer is back to the pool's own). So a payload that the protocol core keeps (a cached
reply for a resend, a commit parked at a barrier) or that still waits in a send queue is
never overwritten; the pool then simply hands out another buffer. No lifetimes have to be
tracked by hand, and a wrong guess can only cost an allocation, never corrupt data.
"""

from __future__ import annotations

import sys

import numpy as np

#: references to a pooled buffer that nobody else holds: the pool's list and
#: :func:`sys.getrefcount`'s own argument
_FREE = 2


class BufferPool:
    """At most ``keep`` byte buffers (numpy ``uint8``), reused once unreferenced.

    :meth:`get` returns a view of ``nbytes`` bytes of a free buffer at least that big
    (or of a new one); the view (and anything made from it) keeps the buffer busy.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._bufs: list[np.ndarray] = []
        #: buffers allocated so far (a test and a profile read it)
        self.allocations = 0

    def get(self, nbytes: int) -> np.ndarray:
        bufs, smaller = self._bufs, -1
        for i in range(len(bufs)):  # no loop variable: it would hold a reference
            if sys.getrefcount(bufs[i]) <= _FREE:
                if bufs[i].nbytes >= nbytes:
                    return bufs[i][:nbytes]
                smaller = i
        fresh = np.empty(max(nbytes, 1), dtype=np.uint8)
        self.allocations += 1
        if smaller >= 0:  # a free buffer too small for this size: replace it
            bufs[smaller] = fresh
        elif len(bufs) < self.keep:
            bufs.append(fresh)
        return fresh[:nbytes]

    def clear(self) -> None:
        self._bufs.clear()
