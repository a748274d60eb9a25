"""The worker–server protocol, written once and driven by every engine.

* :mod:`~distgrad.protocol.messages` — requests and replies;
* :mod:`~distgrad.protocol.core` — :class:`ProtocolCore`, the server side (attempts,
  positions, exactly-once for every request kind, barrier, gate, reads, validation);
* :mod:`~distgrad.protocol.driver` — :class:`WorkerDriver` and :func:`drive`, the
  worker side over a :class:`Channel`.

No module here does I/O: transports (``sim``, ``local``, ``net``, ``ray``, ``spark``)
decode, call the core, encode.
"""

from distgrad.protocol.core import Admission, ProtocolCore, Rejected, all_finite
from distgrad.protocol.driver import Channel, WorkerDriver, drive
from distgrad.protocol.messages import (
    CommitRequest,
    DoneRequest,
    FailRequest,
    PullRequest,
    Reply,
    Request,
    StatsRequest,
)

__all__ = [
    "Admission",
    "Channel",
    "CommitRequest",
    "DoneRequest",
    "FailRequest",
    "ProtocolCore",
    "PullRequest",
    "Rejected",
    "Reply",
    "Request",
    "StatsRequest",
    "WorkerDriver",
    "all_finite",
    "drive",
]
