"""Network transport for the parameter server (TCP, typed frames, AES-256-GCM sessions).

* :mod:`~distgrad.transport.frames` — the wire format (no pickle);
* :mod:`~distgrad.transport.auth` — the handshake and session keys;
* :mod:`~distgrad.transport.seal` — sealing and opening messages (AES-256-GCM);
* :mod:`~distgrad.transport.buffers` — reused message buffers (no copy, no page faults);
* :mod:`~distgrad.transport.server` — :class:`NetServer` (non-blocking TCP in front of
  :class:`~distgrad.protocol.core.ProtocolCore`, which owns validation, attempts,
  resume and exactly-once);
* :mod:`~distgrad.transport.client` — :class:`NetClient` and :func:`run_worker`.

The server and client modules are imported only when a server or client is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distgrad.transport.client import NetClient, RemoteError, TransportError, run_worker
    from distgrad.transport.server import NetServer

__all__ = ["NetClient", "NetServer", "RemoteError", "TransportError", "run_worker"]


def __getattr__(name: str) -> Any:
    if name in ("NetClient", "RemoteError", "TransportError", "run_worker"):
        from distgrad.transport import client

        return getattr(client, name)
    if name == "NetServer":
        from distgrad.transport.server import NetServer

        return NetServer
    raise AttributeError(name)
