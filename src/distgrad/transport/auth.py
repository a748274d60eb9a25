"""Shared-secret authentication: a mutual HMAC challenge-response, then per-session keys.

Handshake on each TCP connection (both sides know the secret ``S``; ``nc``/``ns``
are 32 random bytes)::

    worker -> HELLO     {nonce: nc, worker, attempt, total, protection, resume}
    server -> CHALLENGE {nonce: ns, protection}
    worker -> AUTH      {proof: HMAC(S, "client" | T)}
    server -> WELCOME   {proof: HMAC(S, "server" | T), ...}   sealed under the new keys

where ``T = SHA-256(HELLO bytes | CHALLENGE bytes)`` is the transcript: the proofs
cover the exact bytes of both claims (worker id, attempt, both protection modes), so
none of them can be changed on the way (no downgrade of the protection), and no
field is ever converted to a fixed-width integer before the secret is checked.
Neither side ever sends the secret. Each direction then has its own key,
``HKDF-SHA256(S, salt = nc | ns, info = "distgrad-2 c2s" | T)`` (``s2c`` for the
other), used with AES-256-GCM by
:class:`~distgrad.transport.seal.Sealer`.

:func:`check_secret` refuses secrets an attacker could guess: shorter than 16
bytes, of fewer than 8 distinct bytes, or with under 64 bits of estimated entropy.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import stat
from collections import Counter
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from distgrad.errors import ConfigError

#: environment variable the CLI reads the secret from (never a command-line flag)
SECRET_ENV = "DISTGRAD_SECRET"
MIN_SECRET = 16
MIN_DISTINCT = 8
#: estimated bits of entropy a secret must hold (length x per-byte Shannon entropy)
MIN_BITS = 64.0
_HOW = ("make one with `python -c 'import secrets; print(secrets.token_hex(32))'` or let "
        "`distgrad serve --secret-file PATH` write one to a new file")


def new_secret() -> bytes:
    """A fresh random secret (32 bytes, written as 64 hex characters)."""
    return secrets.token_hex(32).encode()


def secret_bits(data: bytes) -> float:
    """Estimated entropy of ``data`` in bits: its length times the Shannon entropy of its
    byte distribution (a crude bound, enough to refuse repetitive or tiny secrets)."""
    if not data:
        return 0.0
    n = len(data)
    return n * -sum(c / n * math.log2(c / n) for c in Counter(data).values())


def check_secret(secret: bytes | str) -> bytes:
    """The secret (stripped of surrounding whitespace) if it is strong enough, else a
    :class:`ConfigError` that says why and how to make a good one."""
    data = secret.encode() if isinstance(secret, str) else bytes(secret)
    data = data.strip()
    if len(data) < MIN_SECRET:
        raise ConfigError(f"the shared secret is too short: {len(data)} bytes, at least "
                          f"{MIN_SECRET} are needed; {_HOW}")
    distinct = len(set(data))
    if distinct < MIN_DISTINCT:
        raise ConfigError(f"the shared secret is too repetitive: only {distinct} distinct "
                          f"byte value(s), at least {MIN_DISTINCT} are needed; {_HOW}")
    bits = secret_bits(data)
    if bits < MIN_BITS:
        raise ConfigError(f"the shared secret is too guessable: about {bits:.0f} bits of "
                          f"entropy, at least {MIN_BITS:.0f} are needed; {_HOW}")
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
    try:
        return check_secret(p.read_bytes())
    except ConfigError as exc:
        raise ConfigError(f"secret file {str(p)!r}: {exc}") from None


def transcript(hello: bytes, challenge: bytes) -> bytes:
    """What both proofs and the session keys are bound to: the exact bytes of both
    unsealed handshake messages (so neither side's claims can be altered on the way)."""
    return hashlib.sha256(len(hello).to_bytes(4, "little") + hello + challenge).digest()


def client_proof(secret: bytes, transcript_: bytes) -> bytes:
    return hmac.new(secret, b"distgrad-2-client" + transcript_, hashlib.sha256).digest()


def server_proof(secret: bytes, transcript_: bytes) -> bytes:
    return hmac.new(secret, b"distgrad-2-server" + transcript_, hashlib.sha256).digest()


def session_keys(secret: bytes, client_nonce: bytes, server_nonce: bytes,
                 transcript_: bytes) -> tuple[bytes, bytes]:
    """(client→server key, server→client key), 32 bytes each."""

    def derive(direction: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=client_nonce + server_nonce,
                    info=b"distgrad-2 " + direction + transcript_).derive(secret)

    return derive(b"c2s"), derive(b"s2c")


def proofs_equal(a: bytes, b: bytes) -> bool:
    return len(a) == len(b) and hmac.compare_digest(a, b)


def nonce() -> bytes:
    return secrets.token_bytes(32)
