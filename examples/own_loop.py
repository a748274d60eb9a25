"""Your own training loop as a worker of ``distgrad serve`` (:mod:`distgrad.loop`).

Start a server whose job names the same model and data, then run this script once per
worker, from any launcher (a shell, SLURM, torchrun, Kubernetes)::

    python -m distgrad serve --model examples.user_model:make_model \\
        --data examples.user_model:make_data --algorithm downpour --workers 2 \\
        --secret-file secret --out runs/own-loop
    python examples/own_loop.py --connect tcp://127.0.0.1:PORT --secret-file secret

The loop below is ordinary PyTorch: its own optimizer (AdamW), its own loss, its own
``backward``/``step``. One call per step, ``dl.step(...)``, lets distgrad pull, commit
and apply the algorithm's worker rule.
"""

from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F

from distgrad.loop import DistributedLoop
from distgrad.transport.auth import read_secret_file
from examples.user_model import make_model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--connect", required=True, help="the server's tcp://HOST:PORT")
    p.add_argument("--secret-file", required=True, help="file holding the shared secret")
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)
    secret = read_secret_file(args.secret_file)
    torch.set_num_threads(1)

    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    with DistributedLoop(model, optimizer, args.connect, secret) as dl:
        for x, y in dl.batches():
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            dl.step(len(x), loss=loss.item())
    print(f"worker {dl.worker}: {dl.samples} samples trained")


if __name__ == "__main__":  # the guard: nothing runs when a worker process imports this
    main()
