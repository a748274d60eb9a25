"""Models: the thesis MLP, a small CNN, a small GPT, and seeded initialisation for any module.

Initialisation follows Keras' defaults, as the thesis models used: Glorot-uniform
weights and zero biases for dense and convolution layers. It draws from a
``torch.Generator`` seeded by the job, never from the global RNG.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from distgrad.errors import choose
from distgrad.models.gpt import GPT


class MLP(nn.Sequential):
    """Thesis appendix A: Dense(1000)–ReLU–Dense(2000)–ReLU–Dense(1000)–ReLU–Dense(10).

    4,798,010 parameters for 784 inputs and 10 classes. Outputs logits (the
    softmax lives in the cross-entropy loss).
    """

    def __init__(self, inputs: int = 784, classes: int = 10,
                 hidden: tuple[int, ...] = (1000, 2000, 1000)) -> None:
        layers: list[nn.Module] = []
        width = inputs
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, classes))
        super().__init__(*layers)


class CNN(nn.Module):
    """A small LeNet-style CNN for 28×28 single-channel images given as flat 784-vectors."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
                                  nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 28, 28)))


def initialize(module: nn.Module, seed: int) -> nn.Module:
    """Glorot-uniform weights and zero biases for Linear/Conv layers, seeded; in place.

    Other layers with a ``reset_parameters`` method are reset under a forked,
    seeded RNG so the global generator is left untouched.
    """
    g = torch.Generator().manual_seed(seed)
    own = getattr(module, "init_weights", None)
    if callable(own):  # a model with its own scheme (the GPT): seeded from the same generator
        own(g)
        return module
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
                nn.init.xavier_uniform_(sub.weight, generator=g)
                if sub.bias is not None:
                    nn.init.zeros_(sub.bias)
            elif (sub is not module and hasattr(sub, "reset_parameters")
                  and not list(sub.children())):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
                    sub.reset_parameters()
    return module


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": MLP, "cnn": CNN, "gpt": GPT}
"""Named models; any other model enters by import path (``--model pkg.module:factory``)."""


def build_model(name: str, seed: int) -> nn.Module:
    """A fresh, seeded instance of the named model."""
    return initialize(MODELS[choose("model", name, MODELS)](), seed)


__all__ = ["CNN", "GPT", "MLP", "MODELS", "build_model", "initialize"]
