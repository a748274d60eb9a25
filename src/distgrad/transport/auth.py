"""Shared-secret authentication: a mutual HMAC challenge-response, then per-session keys.

Handshake (both sides know the secret ``S``; ``nc``/``ns`` are 32 random bytes)::

    worker -> HELLO  {nonce: nc, worker, attempt}
    server -> CHALLENGE {nonce: ns}
    worker -> AUTH   mac = HMAC(S, "client" | ns | nc | worker | attempt)
    server -> WELCOME {proof: HMAC(S, "server" | nc | ns), session, ...}

Neither side ever sends the secret. After the handshake every message carries
HMAC-SHA256 under the session key ``K = HMAC(S, "session" | nc | ns)`` over its
header (which holds the sequence number and payload length) and, with
``integrity="full"``, over the payload too. A peer without the secret can
neither complete the handshake nor forge a message of an open session. There
is no encryption: run on a private network (or a VPN) if the parameters are
confidential.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from distgrad.errors import ConfigError

#: environment variable the CLI reads the secret from (never a command-line flag)
SECRET_ENV = "DISTGRAD_SECRET"
MIN_SECRET = 16
INTEGRITY = ("full", "header")


def new_secret() -> bytes:
    """A fresh random secret (32 bytes, written as 64 hex characters)."""
    return secrets.token_hex(32).encode()


def check_secret(secret: bytes | str) -> bytes:
    data = secret.encode() if isinstance(secret, str) else bytes(secret)
    data = data.strip()
    if len(data) < MIN_SECRET:
        raise ConfigError(f"the shared secret must be at least {MIN_SECRET} bytes, "
                          f"got {len(data)}")
    return data


def read_secret_file(path: str | Path, create: bool = False) -> bytes:
    """Read the secret from ``path``; with ``create``, write a fresh one (mode 0600) first
    if the file does not exist."""
    p = Path(path)
    if not p.exists():
        if not create:
            raise ConfigError(f"secret file {str(p)!r} does not exist")
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(new_secret() + b"\n")
    mode = p.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"secret file {str(p)!r} is readable by others (mode "
                          f"{stat.S_IMODE(mode):o}); chmod 600 it")
    return check_secret(p.read_bytes())


def _ints(*values: int) -> bytes:
    return b"".join(v.to_bytes(8, "little", signed=True) for v in values)


def client_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes, worker: int,
                 attempt: int) -> bytes:
    return hmac.new(secret, b"distgrad-client" + server_nonce + client_nonce +
                    _ints(worker, attempt), hashlib.sha256).digest()


def server_proof(secret: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(secret, b"distgrad-server" + client_nonce + server_nonce,
                    hashlib.sha256).digest()


def session_key(secret: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(secret, b"distgrad-session" + client_nonce + server_nonce,
                    hashlib.sha256).digest()


def nonce() -> bytes:
    return secrets.token_bytes(32)
