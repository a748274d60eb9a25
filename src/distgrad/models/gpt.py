"""A small GPT (decoder-only transformer) over bytes, nanoGPT-shaped, trainable on a CPU.

``GPT()`` — 4 layers, 4 heads, width 128, context 64 bytes, vocabulary 256 (bytes): about
0.84 M parameters; ``GPT(n_layer=6, n_embd=256)`` has 4.8 M. Pre-norm blocks (LayerNorm,
causal self-attention through ``scaled_dot_product_attention``, a 4× GELU MLP),
learned positions, the output head tied to the token embedding, no dropout (the
training data is small, runs are short). Input: int64 tokens (B, T ≤ block); output:
logits (B, T, vocab). Initialisation as nanoGPT: N(0, 0.02) weights, zero biases, the
residual projections scaled by 1/√(2·n_layer), drawn from a seeded generator
(:meth:`GPT.init_weights`, used by :func:`distgrad.models.initialize`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        shape = (b, t, self.n_head, c // self.n_head)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln2 = nn.LayerNorm(n_embd)
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A byte-level GPT; see the module docstring."""

    def __init__(self, vocab: int = 256, block: int = 64, n_layer: int = 4, n_head: int = 4,
                 n_embd: int = 128) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not a multiple of n_head={n_head}")
        self.block = block
        self.n_layer = n_layer
        self.tok = nn.Embedding(vocab, n_embd)
        self.pos = nn.Embedding(block, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.init_weights(None)  # from torch's global generator, as any torch module

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block:
            raise ValueError(f"sequence of {t} tokens is longer than the context {self.block}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return F.linear(self.ln_f(x), self.tok.weight)  # head tied to the embedding

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None) -> None:
        """nanoGPT's initialisation from ``generator`` (None: the global one), in place."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln" in name or name.startswith("ln_"):
                p.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * self.n_layer) if name.endswith("proj.weight") else 0.02
                p.copy_(torch.randn(p.shape, generator=generator) * std)


__all__ = ["GPT"]
