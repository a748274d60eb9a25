"""Network transport vs shared memory: round trips per second and GB/s.

One round trip = what a worker does per window with a DOWNPOUR-family rule: send
a commit of n float32 parameters and get the new center back (commit with
pull), i.e. 2 x 4n bytes moved. The network side is a real ``NetServer`` (ZeroMQ
over TCP loopback, HMAC-SHA256 authentication, one commit at a time through
``ParameterServer``) in a separate process, and a ``NetClient`` here. The
baseline, measured in the same run, is the same arithmetic on a shared-memory
center in this process — ``center += payload; into.copy_(center)`` — which is
what a shared-memory engine pays per commit and pull before any signalling.
Medians over repetitions; ratios network / baseline.

    python benchmarks/transport.py [--sizes 1000,4798010] [--repeats 30]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch

SECRET = b"benchmark-secret-benchmark-secret"


def serve(n: int, integrity: str, queue: mp.Queue, stop: mp.Event) -> None:
    torch.set_num_threads(1)
    from distgrad.algorithms import RunInfo, get_algorithm
    from distgrad.protocol.core import ProtocolCore
    from distgrad.server import ParameterServer
    from distgrad.transport.server import NetServer

    algo = get_algorithm("downpour")
    rule = algo.server_rule(algo.make_config({"window": 1}), RunInfo(1, 0.1, "sgd"))
    server = ParameterServer(torch.zeros(n), rule, workers=1, track_distance=False)
    core = ProtocolCore(server, None, time.perf_counter)
    net = NetServer(core, SECRET, integrity=integrity, worker_timeout=3600)
    queue.put(net.address)
    net.serve(until=stop.is_set)
    net.close()


def network_round_trips(n: int, integrity: str, repeats: int) -> list[float]:
    from distgrad.transport.client import NetClient

    ctx = mp.get_context("spawn")
    queue, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=serve, args=(n, integrity, queue, stop))
    proc.start()
    try:
        client = NetClient(queue.get(timeout=120), SECRET, timeout=120)
        payload, into = torch.full((n,), 1e-6), torch.empty(n)
        client.pull(into)
        times = []
        for i in range(repeats + 3):
            t = time.perf_counter()
            client.commit(payload, steps=1, samples=1, pull_into=into)
            if i >= 3:  # warm-up
                times.append(time.perf_counter() - t)
        client.close()
        return times
    finally:
        stop.set()
        proc.join(30)


def shared_memory_round_trips(n: int, repeats: int) -> list[float]:
    center = torch.zeros(n).share_memory_()
    payload, into = torch.full((n,), 1e-6), torch.empty(n)
    times = []
    for i in range(repeats + 3):
        t = time.perf_counter()
        center.add_(payload)
        into.copy_(center)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,4798010",
                        help="parameter counts (default: 1k, and the thesis MLP's 4,798,010)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'parameters':>11} {'path':<26} {'median ms':>10} {'round trips/s':>14} "
          f"{'GB/s':>7} {'vs shm':>8}")
    for n in (int(s) for s in args.sizes.split(",")):
        moved = 2 * 4 * n
        base = statistics.median(shared_memory_round_trips(n, args.repeats))
        rows = [("shared memory (baseline)", base)]
        for integrity in ("full", "header"):
            med = statistics.median(network_round_trips(n, integrity, args.repeats))
            rows.append((f"zmq tcp, mac {integrity}", med))
        for name, med in rows:
            print(f"{n:>11,} {name:<26} {med * 1e3:>10.3f} {1 / med:>14.1f} "
                  f"{moved / med / 1e9:>7.2f} {med / base:>7.1f}x")


if __name__ == "__main__":
    main()
