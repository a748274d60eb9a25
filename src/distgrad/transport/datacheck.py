"""A joining worker checks that it rebuilt the server's data.

A ``distgrad work`` process rebuilds the model and data from the job's import paths with
*its* installed version of the user's module; another version (other files, another
default argument) would silently mix two data sets in one run. The server sends its
data fingerprint in the WELCOME (:func:`welcome_data`, beside the job: JSON), and the
worker compares it with its own right after building its parts (:func:`check_same_data`),
before its first commit.

The fingerprint is the one ``config.json`` records (:func:`distgrad.parts.identity_of`:
the training and test data's shapes, dtypes and bytes). Per-worker streams have no
single data set (each worker may read its own files), so for them what every host must
agree on is compared: the samples each worker declares and the test data.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

from distgrad.errors import ConfigError

log = logging.getLogger("distgrad.transport")

#: the WELCOME key that carries the server's data fingerprint
KEY = "data_fingerprint"


def data_fingerprint(parts: Any) -> str:
    """The fingerprint of ``parts``' data that a worker on another host can reproduce:
    ``config.json``'s ``data_fingerprint``, or for per-worker streams ``streams:`` and a
    hash of the declared samples per worker and the test data."""
    if parts.streams is None:
        return str(parts.identity["data_fingerprint"])
    from distgrad.data import Dataset
    from distgrad.parts import fingerprint

    d = parts.dataset
    test = fingerprint(Dataset(d.name, d.x_test[:0], d.y_test[:0], d.x_test, d.y_test))
    counts = [len(s) for s in parts.shards]
    digest = hashlib.sha256(f"{json.dumps(counts)};{test}".encode()).hexdigest()[:16]
    return f"streams:{digest}"


def welcome_data(parts: Any) -> dict[str, Any]:
    """What the server adds to the WELCOME for :func:`check_same_data`."""
    return {KEY: data_fingerprint(parts)}


def check_same_data(info: Mapping[str, Any], parts: Any, address: str) -> None:
    """Raise a one-line :class:`ConfigError` when the server's data fingerprint (in its
    WELCOME ``info``) differs from this worker's ``parts``; log and go on where the server
    sent none (an older server)."""
    theirs = info.get(KEY)
    if theirs is None:
        log.info("the server at %s sent no data fingerprint: the data are not checked",
                 address)
        return
    mine = data_fingerprint(parts)
    job = parts.job
    if parts.streams is not None:
        log.info("per-worker streams: the declared samples and the test data are checked, "
                 "not each worker's batches")
    if mine != theirs:
        args = f" with {json.dumps(dict(job.data_args), sort_keys=True)}" if job.data_args \
            else ""
        raise ConfigError(f"this worker's data differ from the server's: data {job.dataset!r}"
                          f"{args} has fingerprint {mine} here, {theirs} on the server at "
                          f"{address}; install the same version of the data module on every "
                          f"host")
