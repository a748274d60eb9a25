"""Sealing messages of an authenticated session with AES-256-GCM (``cryptography``).

Each direction of a session has its own 32-byte key (derived in
:func:`distgrad.transport.auth.session_keys`) and its own message counter, which
starts at 0 and goes up by one per message; the receiver accepts only the next
counter, so a replayed, reordered or dropped-and-spliced message fails. The
12-byte AES-GCM nonce is ``counter (8 bytes LE) | index (4 bytes LE)``: index
``0xFFFFFFFF`` for the header tag and ``i`` for the i-th payload chunk, so no
(key, nonce) pair is ever used twice.

* header tag: GMAC of the header (AES-GCM with an empty plaintext and the header
  as associated data) — every protection mode; checked before the body is read.
* ``encrypt``: each :data:`~distgrad.transport.frames.CHUNK` of payload is
  encrypted, ciphertext followed by its tag (the body is ``ct_0 | tag_0 | ct_1 | …``).
* ``integrity``: the payload travels in clear, followed by one GMAC tag per chunk.
* ``header``: the payload travels in clear and unauthenticated (only a peer holding
  the session key can send a message, but bytes of a payload can be altered).

Payloads are sealed and opened chunk by chunk straight into the output buffer
(``encrypt_into``/``decrypt_into`` where the library has them; encrypted bodies go into
reused buffers, see :mod:`~distgrad.transport.buffers`). A large payload may be split
into :data:`THREADS` contiguous runs of chunks, one per thread (``cryptography``
releases the GIL inside AES-GCM).
AES-256-GCM was chosen over ChaCha20-Poly1305 by measurement on a 19.2 MB
payload (see ``docs/threat-model.md``).
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from distgrad.transport.buffers import BufferPool
from distgrad.transport.frames import CHUNK, TAG, DType, FrameError, chunks

_HEADER_INDEX = 0xFFFFFFFF
_NONCE = struct.Struct("<QI")
_HAS_INTO = hasattr(AESGCM, "encrypt_into") and hasattr(AESGCM, "decrypt_into")
#: threads that seal or open one large payload (the calling thread is one of them); 1
#: keeps everything on the calling thread. Each extra thread costs one handoff (a wake-up)
#: per payload; measured on 2 cores, 2 threads gave 1.07-1.34x the round trips/s of 1.
THREADS = max(1, min(4, os.cpu_count() or 1))
#: payload bytes below which a payload is never split across threads
PARALLEL_BYTES = 8 * CHUNK
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="distgrad-seal")
        return _pool


def _run(job: Callable[[int, int], None], count: int, length: int) -> None:
    """``job(first, stop)`` over the chunk indices ``range(count)``: in one call on this
    thread, or split into :data:`THREADS` contiguous runs (one handoff per extra thread,
    this thread doing the first run)."""
    threads = min(THREADS, count) if length >= PARALLEL_BYTES else 1
    if threads <= 1:
        job(0, count)
        return
    cuts = [count * t // threads for t in range(threads + 1)]
    futures = [_executor().submit(job, cuts[t], cuts[t + 1]) for t in range(1, threads)]
    try:
        job(cuts[0], cuts[1])
    finally:
        for f in futures:
            f.result()


def effective(protection: str, dtype: int) -> str:
    """The protection a message gets: JSON payloads (the welcome with the job, reasons)
    are always at least authenticated."""
    return "integrity" if protection == "header" and dtype == DType.JSON else protection


class Sealer:
    """One direction of a session: seals (sender) or opens (receiver) its messages in
    counter order; ``mode`` is the message's :func:`effective` protection. Encrypted
    bodies are written into reused buffers (:class:`BufferPool`)."""

    def __init__(self, key: bytes) -> None:
        self.aead = AESGCM(key)
        self.counter = 0
        self.pool = BufferPool(keep=2)

    def _nonce(self, index: int) -> bytes:
        return _NONCE.pack(self.counter, index)

    # ------------------------------------------------------------------ sending
    def seal(self, header: bytes, payload: memoryview, mode: str) -> list[Any]:
        """The buffers to send after ``header`` (which holds this sealer's counter):
        [header tag, body...]; advances the counter. The payload is sent from where it is
        (``integrity``/``header``) or encrypted into a pooled buffer (``encrypt``)."""
        payload = memoryview(payload)
        if payload.format != "B" or payload.ndim != 1:
            payload = payload.cast("B")
        aead, counter, length = self.aead, self.counter, len(payload)
        htag = aead.encrypt(_NONCE.pack(counter, _HEADER_INDEX), b"", header)
        count = chunks(length)
        if mode == "header" or not count:
            out: list[Any] = [htag, payload] if length else [htag]
        elif mode == "integrity":
            tags = bytearray(TAG * count)

            def gmac(first: int, stop: int) -> None:
                for i in range(first, stop):
                    off = i * CHUNK
                    tags[i * TAG:(i + 1) * TAG] = aead.encrypt(
                        _NONCE.pack(counter, i), b"", payload[off:off + CHUNK])

            _run(gmac, count, length)
            out = [htag, payload, tags]
        else:
            body = memoryview(self.pool.get(length + TAG * count))

            def enc(first: int, stop: int) -> None:
                for i in range(first, stop):
                    off = i * CHUNK
                    n = min(CHUNK, length - off)
                    dst = body[off + i * TAG: off + i * TAG + n + TAG]
                    if _HAS_INTO:
                        aead.encrypt_into(_NONCE.pack(counter, i), payload[off:off + n],
                                          None, dst)
                    else:
                        dst[:] = aead.encrypt(_NONCE.pack(counter, i), payload[off:off + n],
                                              None)

            _run(enc, count, length)
            out = [htag, body]
        self.counter += 1
        return out

    # ------------------------------------------------------------------ receiving
    def check_header(self, header_bytes: bytes, counter: int, htag: bytes | memoryview
                     ) -> None:
        """Authenticate a header (before its body is read); raise :class:`FrameError`."""
        if counter != self.counter:
            raise FrameError(f"message counter {counter}, expected {self.counter} (a replayed, "
                             f"reordered or lost message)")
        try:
            self.aead.decrypt(self._nonce(_HEADER_INDEX), bytes(htag), header_bytes)
        except InvalidTag:
            raise FrameError("header authentication failed (wrong session key or altered "
                             "bytes)") from None

    def open(self, body: memoryview, length: int, mode: str, out: memoryview | None = None,
             tags: memoryview | None = None) -> memoryview:
        """Check (and decrypt) a body whose header passed :meth:`check_header`; return
        the payload: decrypted into ``out`` (``encrypt``; a new buffer when None), else a
        view of ``body``. ``tags``: an ``integrity`` body's chunk tags when they were
        received apart from the payload (``body`` then holds just the payload). Advances
        the counter."""
        aead, counter, count = self.aead, self.counter, chunks(length)
        failed: list[int] = []
        if mode == "header" or not count:
            result = body[:length]
        elif mode == "integrity":
            tag_view = body[length:] if tags is None else tags

            def verify(first: int, stop: int) -> None:
                for i in range(first, stop):
                    off = i * CHUNK
                    try:
                        aead.decrypt(_NONCE.pack(counter, i),
                                     bytes(tag_view[i * TAG:(i + 1) * TAG]),
                                     body[off:min(off + CHUNK, length)])
                    except InvalidTag:
                        failed.append(i)

            _run(verify, count, length)
            result = body[:length]
        else:
            dst = out if out is not None else memoryview(bytearray(length))

            def dec(first: int, stop: int) -> None:
                for i in range(first, stop):
                    off = i * CHUNK
                    n = min(CHUNK, length - off)
                    src = body[off + i * TAG: off + i * TAG + n + TAG]
                    try:
                        if _HAS_INTO:
                            aead.decrypt_into(_NONCE.pack(counter, i), src, None,
                                              dst[off:off + n])
                        else:
                            dst[off:off + n] = aead.decrypt(_NONCE.pack(counter, i),
                                                            bytes(src), None)
                    except InvalidTag:
                        failed.append(i)

            _run(dec, count, length)
            result = dst
        if failed:
            raise FrameError(f"payload authentication failed in chunk {min(failed)} (altered "
                             "bytes)")
        self.counter += 1
        return result
