"""A calibrated cost model for the simulator: per-commit costs measured on this machine.

The simulator's virtual clock counts compute only unless it is given ``server_time`` (the
server's time to apply one commit; commits queue behind each other, as on the thesis'
one-lock server) and ``commit_time`` (a commit's and its pull's transfer, which the worker
waits for). :func:`measure_costs` measures them for the thesis MLP (4,798,010 float32
parameters) with one torch thread, as the ``local`` engine's workers and server run:

* ``step_seconds`` — one worker step: forward, backward and Adam on a batch of 128 MNIST
  images. The simulator's ``step_time`` stands for it; every other cost is converted to
  virtual seconds in units of it (:func:`distgrad.engines.timing.profile_costs`).
* ``server_seconds[algorithm]`` — :meth:`ParameterServer.commit` with the algorithm's rule
  and the pull that answers it, as the server runs them under its lock (no distance
  tracking, as the reproduction's runs).
* ``commit_seconds`` — the transfer on ``local``: the worker copies its payload into shared
  memory, the pulled center back out of it (two copies of the parameter vector), and one
  request/reply round trip over a pipe between two processes.

``distgrad reproduce --measure-costs FILE`` writes the profile; ``distgrad train
--engine sim --cost-profile FILE`` (or :class:`~distgrad.engines.timing.Timing`'s
``cost_profile``) uses it. The profile measures costs, not a network: the thesis ran
dist-keras over TCP with pickled weights, which costs more than shared memory.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distgrad.engines.timing import COST_PROFILE_KIND

ALGORITHMS = ("downpour", "agn", "aeasgd", "dynsgd", "adag")
"""The thesis' asynchronous algorithms whose server cost the profile holds."""


def _median(fn: Callable[[], Any], repeats: int, warmup: int = 2,
            clock: Callable[[], float] = time.process_time) -> float:
    """Median seconds of ``fn()``; by default CPU seconds of this process (one torch
    thread), which other processes competing for the cores do not inflate."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = clock()
        fn()
        times.append(clock() - t)
    return statistics.median(times)


def _step_seconds(repeats: int) -> float:
    from distgrad.data import load_mnist
    from distgrad.models import build_model

    d = load_mnist()
    model = build_model("mlp", 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = d.x_train[:128], d.y_train[:128]

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return _median(step, repeats)


def _server_seconds(name: str, size: int, repeats: int) -> float:
    from distgrad.algorithms import RunInfo, get_algorithm
    from distgrad.server import ParameterServer

    algo = get_algorithm(name)
    g = torch.Generator().manual_seed(0)
    server = ParameterServer(torch.randn(size, generator=g),
                             algo.server_rule(algo.make_config({}),
                                              RunInfo(workers=2, lr=1e-3,
                                                      inner_optimizer="adam")),
                             2, track_distance=False, keep_stale=False)
    base = torch.empty(size)
    server.pull(0, base)
    payload = torch.randn(size, generator=g) * 1e-3

    def commit_pull() -> None:
        server.commit(0, payload, steps=1, samples=1, stale_center=base)
        server.base_version[0] = server.version - 1  # τ = 1 every time
        server.pull(0, base)

    return _median(commit_pull, repeats)


def _echo(conn: Any) -> None:
    while True:
        msg = conn.recv_bytes()
        if not msg:
            return
        conn.send_bytes(msg)


def _pipe_round_trip(repeats: int) -> float:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_echo, args=(child,), daemon=True)
    proc.start()
    try:
        msg = b"x" * 32

        def ping() -> None:
            parent.send_bytes(msg)
            parent.recv_bytes()

        return _median(ping, repeats * 10, warmup=20, clock=time.perf_counter)  # waits
    finally:
        parent.send_bytes(b"")
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)


def _socket_seconds(nbytes: int, repeats: int) -> float:
    """Wall seconds to move ``nbytes`` through a loopback socket pair (send until the
    other end, a thread, has received them all)."""
    import socket
    import threading

    a, b = socket.socketpair()
    data = bytes(nbytes)
    buf = bytearray(nbytes)
    view = memoryview(buf)
    ready, done = threading.Semaphore(0), threading.Semaphore(0)
    stop = [False]

    def reader() -> None:
        while True:
            ready.acquire()
            if stop[0]:
                return
            got = 0
            while got < nbytes:
                got += b.recv_into(view[got:], nbytes - got)
            done.release()

    th = threading.Thread(target=reader, daemon=True)
    th.start()

    def move() -> None:
        ready.release()
        a.sendall(data)
        done.acquire()

    try:
        return _median(move, repeats, clock=time.perf_counter)
    finally:
        stop[0] = True
        ready.release()
        th.join(timeout=5)
        a.close()
        b.close()


def _distkeras_costs(params: int, repeats: int) -> dict[str, float]:
    """dist-keras' per-commit extra costs: pickling the weights (``pickle.dumps`` of a
    float32 array) and unpickling them, and moving the bytes through a TCP socket."""
    import pickle

    import numpy as np

    arr = np.random.default_rng(0).standard_normal(params).astype(np.float32)
    blob = pickle.dumps(arr, protocol=pickle.HIGHEST_PROTOCOL)
    return {"pickle_seconds": _median(lambda: pickle.dumps(arr, protocol=pickle.HIGHEST_PROTOCOL),
                                      repeats),
            "unpickle_seconds": _median(lambda: pickle.loads(blob), repeats),
            "socket_seconds": _socket_seconds(len(blob), repeats)}


def measure_costs(repeats: int = 20, *, size: int | None = None,
                  engine: str = "local") -> dict[str, Any]:
    """The cost profile of this machine (one torch thread) for the thesis MLP, or for a
    parameter vector of ``size`` floats (tests).

    ``engine="local"``: distgrad's shared-memory engine (above). ``engine="distkeras"``:
    the thesis' transport, modelled from measured parts: each commit's weights are pickled
    by the worker, sent over TCP, unpickled by the server, applied, and the center is
    pickled back and sent (dist-keras' socket server runs its handlers as Python threads,
    so the server's share — unpickle, apply, pickle, two socket transfers — is serialized
    and counts in ``server_seconds``; the worker's pickle and unpickle are its own and
    count in ``commit_seconds``)."""
    if engine not in ("local", "distkeras"):
        raise ValueError(f"engine must be 'local' or 'distkeras', got {engine!r}")
    from distgrad.models import build_model
    from distgrad.reproduce.provenance import machine

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params = size or sum(p.numel() for p in build_model("mlp", 0).parameters())
        step = _step_seconds(repeats) if size is None else None
        server = {name: _server_seconds(name, params, repeats) for name in ALGORITHMS}
        src, dst = torch.randn(params), torch.empty(params)
        copy = _median(lambda: dst.copy_(src), repeats)
        pipe = _pipe_round_trip(repeats)
        parts: dict[str, float] = {"copy_seconds": copy, "pipe_round_trip_seconds": pipe}
        commit = 2 * copy + pipe
        note = ("medians of repeated measurements; server_seconds: commit + pull under the "
                "server's lock (no distance tracking); commit_seconds: two copies of the "
                "parameter vector and one pipe round trip (the local engine's transfer)")
        if engine == "distkeras":
            dk = _distkeras_costs(params, repeats)
            parts.update(dk)
            extra = dk["unpickle_seconds"] + dk["pickle_seconds"] + 2 * dk["socket_seconds"]
            server = {k: v + extra for k, v in server.items()}
            commit = dk["pickle_seconds"] + dk["unpickle_seconds"]
            note = ("medians of repeated measurements; dist-keras' transport modelled from "
                    "measured parts: server_seconds = apply + pull + unpickle of the commit + "
                    "pickle of the center + two loopback TCP transfers of the pickled "
                    "weights (serialized: Python handler threads); commit_seconds = the "
                    "worker's own pickle + unpickle")
    finally:
        torch.set_num_threads(old)
    return {
        "kind": COST_PROFILE_KIND, "format": 1,
        "engine": engine, "model": "mlp" if size is None else f"vector of {size}",
        "parameters": params, "threads": 1,
        "step_seconds": step if step is not None else 2 * copy,
        "server_seconds": server,
        "commit_seconds": commit,
        "parts": parts,
        "repeats": repeats, "machine": machine(),
        "note": note,
    }


def write_profile(path: str | Path, profile: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=1) + "\n")
    return path


def describe(profile: dict[str, Any], step_time: float = 0.05) -> str:
    """One line per cost, in ms and in virtual seconds at ``step_time``."""
    from distgrad.engines.timing import profile_costs

    lines = [f"step (thesis MLP, batch 128, Adam): {1e3 * profile['step_seconds']:.2f} ms"]
    for name in sorted(profile["server_seconds"]):
        server, commit = profile_costs(profile, name, profile["parameters"], step_time)
        lines.append(f"server apply + pull, {name}: "
                     f"{1e3 * profile['server_seconds'][name]:.2f} ms = {server:.5f} virtual s")
    lines.append(f"commit + pull transfer ({profile.get('engine', 'local')}, the worker's "
                 f"share): {1e3 * profile['commit_seconds']:.2f} ms = "
                 f"{commit:.5f} virtual s (step_time {step_time:g})")
    return "\n".join(lines)
