"""Text corpora for language models, shipped with distgrad (nothing is downloaded).

``pystdlib``: 1,135,313 bytes of Python source and docstrings — 27 modules of the
CPython 3.11.7 standard library (``textwrap``, ``argparse``, ``difflib``,
``statistics``, ``functools``, ``dataclasses``, ``enum``, ``inspect``, ``typing``,
``pathlib``, ``optparse``, ``configparser``, ...; the list is the header line of each
part), concatenated. Licence: the PSF License Agreement for Python 3.11, which permits
redistribution with its notice; the notice ships beside the corpus as
``pystdlib-LICENSE.txt``. (sha256 of the text:
``94c4ff6901e84889badfc0c86d2687399334b0d31c3b94b21686d78c4cd7e5f2``.)

Tokens are bytes (a vocabulary of 256, no tokenizer to ship). A sample is a window of
``block`` bytes ``x`` and the same window shifted by one, ``y`` (next-byte targets):
the training windows tile the first 95 % of the bytes without overlap; the test
windows the last 5 % (about 880 windows of 64 bytes). The model's loss is the mean
cross-entropy per byte and its metric the perplexity ``exp(loss)``.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from distgrad.data.mnist import Dataset
from distgrad.errors import ConfigError, positive_int

CORPORA = {"pystdlib": Path(__file__).with_name("pystdlib.txt.gz")}
"""Named text corpora (``--dataset NAME`` with a language model)."""

TEST_FRACTION = 0.05
VOCAB = 256


@lru_cache(maxsize=4)
def corpus_bytes(name: str) -> bytes:
    """The raw bytes of a shipped corpus."""
    path = CORPORA.get(name)
    if path is None:
        raise ConfigError(f"unknown corpus {name!r}; choose from: {', '.join(sorted(CORPORA))}")
    if not path.exists():
        raise ConfigError(f"the corpus file {str(path)!r} is missing from this install")
    return gzip.decompress(path.read_bytes())


def windows(tokens: np.ndarray, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of ``block`` tokens and their next-token targets (int64)."""
    n = (len(tokens) - 1) // block
    if n < 1:
        raise ConfigError(f"a text of {len(tokens)} tokens has no window of {block}+1")
    t = torch.from_numpy(tokens[: n * block + 1].astype(np.int64))
    return t[:-1].reshape(n, block).clone(), t[1:].reshape(n, block).clone()


def load_text(name: str = "pystdlib", block: int = 64) -> Dataset:
    """Byte windows of a shipped corpus as a :class:`Dataset` (x, y: int64 (N, block))."""
    positive_int("block", block)
    data = np.frombuffer(corpus_bytes(name), dtype=np.uint8)
    cut = int(len(data) * (1 - TEST_FRACTION))
    x_train, y_train = windows(data[:cut], block)
    x_test, y_test = windows(data[cut:], block)
    return Dataset(name, x_train, y_train, x_test, y_test)


def text_data(corpus: str = "pystdlib", block: int = 64
              ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A data factory (``--data distgrad.data.text:text_data --data-arg block=128``)."""
    d = load_text(corpus, block)
    return (d.x_train, d.y_train), (d.x_test, d.y_test)
