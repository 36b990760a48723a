"""A small GPT-style decoder-only language model in plain, traceable ops.

    logits = head(ln_f(blocks(drop(tok_emb(idx) + pos_emb(arange(T))))))        (B, T, vocab)
    block  = feed-forward sublayer after causal self-attention sublayer, each pre-LN and residual:
             x + drop(proj(attend(query(ln(x)), key(ln(x)), value(ln(x)))))
             x + drop(fc2(gelu(fc1(ln(x)))))

Every compute op is an nn.Linear or a torch.matmul (QK^T and AV), so fracfx quantizes all of
them without any attention replacement. Each sublayer's residual add is `x + branch` in its own
module's forward, which is the shape DFQ's block detection (passes/annotate_blocks.py) gates;
the `Block` pairs them (gate a whole layer with DFQConfig(block_types=("Block",))).
The causal mask is a registered (non-persistent) buffer, sliced to the sequence length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fracfx.errors import ConfigError


class CausalSelfAttention(nn.Module):
    """Pre-LN multi-head causal self-attention with its residual: x + drop(attention(ln(x)))."""

    def __init__(self, d_model: int, n_heads: int, context: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.scale = 1.0 / math.sqrt(d_model // n_heads)
        self.norm = nn.LayerNorm(d_model)
        # separate Q/K/V layers: each gets its own quantizers (see fracfx/nn/attention.py)
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.attn_drop = nn.Dropout(dropout)
        self.drop = nn.Dropout(dropout)
        self.register_buffer("causal_mask", torch.ones(context, context, dtype=torch.bool).triu(1), persistent=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)  # (B, T, C) -> (B, H, T, C/H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self._heads(self.query(h)), self._heads(self.key(h)), self._heads(self.value(h))
        t = x.shape[1]
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        # narrow, not [:t, :t]: torch.fx can pass a traced length to a method but not to a slice of a buffer
        scores = scores.masked_fill(self.causal_mask.narrow(0, 0, t).narrow(1, 0, t), float("-inf"))
        attended = torch.matmul(self.attn_drop(torch.softmax(scores, dim=-1)), v)
        return x + self.drop(self.proj(attended.transpose(1, 2).flatten(2)))


class FeedForward(nn.Module):
    """Pre-LN MLP with its residual: x + drop(fc2(gelu(fc1(ln(x)))))."""

    def __init__(self, d_model: int, dropout: float, expansion: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, expansion * d_model)
        self.fc2 = nn.Linear(expansion * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm(x)))))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, context: int, dropout: float):
        super().__init__()
        self.attn = CausalSelfAttention(d_model, n_heads, context, dropout)
        self.ff = FeedForward(d_model, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(self.attn(x))


class TransformerLM(nn.Module):
    """Token ids (B, T) with T <= context -> next-token logits (B, T, vocab_size)."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, context: int, dropout: float, tie_weights: bool):
        super().__init__()
        self.context = context
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(d_model, n_heads, context, dropout) for _ in range(n_layers)))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        _init_weights(self, n_layers)
        if tie_weights:
            self.head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        torch._assert(t <= self.context, "sequence longer than the model's context; use windows of at most `context` tokens")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        return self.head(self.ln_f(self.blocks(self.drop(x))))


def _init_weights(model: TransformerLM, n_layers: int) -> None:
    """GPT-2's: N(0, 0.02) weights, zero biases, residual output layers scaled by 1/sqrt(2 * n_layers)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    for name, param in model.named_parameters():
        if name.endswith(("attn.proj.weight", "ff.fc2.weight")):
            nn.init.normal_(param, std=0.02 / math.sqrt(2 * n_layers))


def transformer_lm(
    *,
    vocab_size: int,
    d_model: int = 128,
    n_layers: int = 2,
    n_heads: int = 4,
    context: int = 128,
    dropout: float = 0.0,
    tie_weights: bool = True,
) -> TransformerLM:
    """A GPT-style decoder LM; the head shares the token embedding unless tie_weights=False."""
    for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads), ("context", context)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"transformer_lm: {name} must be a positive int, got {value!r}")
    if d_model % n_heads:
        raise ConfigError(f"transformer_lm: d_model={d_model} is not divisible by n_heads={n_heads}; pick n_heads dividing d_model")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ConfigError(f"transformer_lm: dropout must be in [0, 1), got {dropout!r}")
    return TransformerLM(vocab_size, d_model, n_layers, n_heads, context, float(dropout), bool(tie_weights))


def transformer_lm_zoo(*, num_classes: int, in_channels: int = 3, **kwargs) -> TransformerLM:
    """transformer_lm in build_model's calling convention: the classes are the vocabulary (next-token
    classification); token ids have no channels, so in_channels must stay at build_model's default."""
    if in_channels != 3:
        raise ConfigError(f"transformer_lm reads token ids and has no input channels; drop in_channels={in_channels}")
    return transformer_lm(vocab_size=num_classes, **kwargs)
