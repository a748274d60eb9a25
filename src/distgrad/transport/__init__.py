"""Network transport for the parameter server (ZeroMQ, typed frames, shared-secret HMAC).

* :mod:`~distgrad.transport.frames` — the wire format (no pickle);
* :mod:`~distgrad.transport.auth` — the handshake and session keys;
* :mod:`~distgrad.transport.server` — :class:`NetServer` (ZeroMQ ROUTER in front of
  :class:`~distgrad.protocol.core.ProtocolCore`, which owns validation, attempts,
  resume and exactly-once);
* :mod:`~distgrad.transport.client` — :class:`NetClient` and :func:`run_worker`.

pyzmq is imported only when a server or client is built.
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
