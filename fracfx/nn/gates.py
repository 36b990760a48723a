"""The DFQ gate network (docs/method.md section 3) as the nn.Modules insert_gates puts in the graph.

Per gated block i, in depth order:

    e_i = embed_i(x_i)              GateEmbedding on channels-first maps (B, C, H, W):
                                      GAP -> 1x1 conv C->32 (+bias) -> ReLU -> 1x1 conv 32->16
                                    TokenGateEmbedding on tokens (B, T, C), channels last:
                                      mean over tokens -> Linear C->32 -> ReLU -> Linear 32->16
    s_i = lstm(e_i, s_{i-1})        ONE shared nn.LSTMCell; no state for block 0: zeros every forward
    m_i = GateChoice_i(head(s_i.h)) shared Linear(hidden -> K); p = softmax, h = one_hot(argmax p),
                                    m = h - p.detach() + p (exactly one-hot forward, softmax backward)

The two embeddings compute the same kind of function (pool the positions, then a per-channel
MLP); they differ in where the channels are. `gate_embedding` builds one for a layout:
"channels_first" (channels at dim 1, positions after: conv feature maps) or "tokens" (channels
last, positions between batch and channels: transformer activations, channels-last maps such
as swin's (B, H, W, C)). insert_gates picks the layout per block (DFQConfig.embed_layout).

For token models the decision is per sequence: the pooled embedding sees every position, so in
a causal LM the precision of position t depends on later tokens too (a choice among K
candidates per block; in training the per-tensor activation ranges mix positions as well).

`CandidateTable` is the per-candidate precision and cost that the mixed quantizers and the
controller share. Everything here is FP32.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from fracfx.bits import cost_bits
from fracfx.config import EMBED_LAYOUTS, FP32_CANDIDATE, SKIP
from fracfx.cost_model import FP32_BITOPS, candidate_bitops  # noqa: F401  (FP32_BITOPS: the runtime's import path)
from fracfx.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class CandidateTable:
    """The K candidates of a DFQConfig in canonical form ("skip", "fp32" or (a, g))."""

    entries: tuple

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def skip_index(self) -> int | None:
        return self.entries.index(SKIP) if SKIP in self.entries else None

    @property
    def fp32_index(self) -> int | None:
        return self.entries.index(FP32_CANDIDATE) if FP32_CANDIDATE in self.entries else None

    @property
    def act_bits(self) -> tuple[int | None, ...]:
        """Activation bits per candidate: 0 = unquantized (FP32), None = skip (no activation)."""
        return tuple(None if e == SKIP else 0 if e == FP32_CANDIDATE else e[0] for e in self.entries)

    @property
    def grad_bits(self) -> tuple[int, ...]:
        """Gradient bits per candidate: 0 = unquantized (FP32 and skip)."""
        return tuple(0 if isinstance(e, str) else e[1] for e in self.entries)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(e if isinstance(e, str) else f"a{cost_bits(e[0])}g{cost_bits(e[1])}" for e in self.entries)

    def bitops(self, index: int, weight_bits: int | None) -> int:
        """a*w + g*w + a*g of one MAC under candidate `index` (fracfx.cost_model.candidate_bitops)."""
        return candidate_bitops(self.entries[index], weight_bits)


def _relu_stack(width: int, dims: tuple[int, ...], layer) -> nn.Sequential:
    """layer(width, dims[0]), ReLU, layer(dims[0], dims[1]), ...: the gate embeddings' MLP."""
    layers: list[nn.Module] = []
    for i, dim in enumerate(dims):
        if i:
            layers.append(nn.ReLU())
        layers.append(layer(width, dim))
        width = dim
    return nn.Sequential(*layers)


class GateEmbedding(nn.Module):
    """Global average pool, then 1x1 convs with ReLU between them: (B, C, ...) -> (B, dims[-1])."""

    def __init__(self, in_channels: int, dims: tuple[int, ...] = (32, 16)):
        super().__init__()
        self.layers = _relu_stack(in_channels, dims, lambda width, dim: nn.Conv2d(width, dim, 1, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.flatten(2).mean(2) if x.dim() > 2 else x  # dim 1 is channels
        return self.layers(pooled[:, :, None, None]).flatten(1)


class TokenGateEmbedding(nn.Module):
    """Mean over tokens, then linears with ReLU between them: (B, T, C) -> (B, dims[-1]).

    Every dim between batch and the last is a position ((B, H, W, C) pools H and W). One
    embedding per sample (per sequence): the batch dim is 0.
    """

    def __init__(self, in_features: int, dims: tuple[int, ...] = (32, 16)):
        super().__init__()
        self.layers = _relu_stack(in_features, dims, nn.Linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.flatten(1, -2).mean(1) if x.dim() > 2 else x  # the last dim is channels
        return self.layers(pooled)


def gate_embedding(layout: str, input_shape: tuple[int, ...], dims: tuple[int, ...]) -> nn.Module:
    """The embedding of a block input of per-sample shape `input_shape` in `layout`."""
    if layout not in EMBED_LAYOUTS[1:]:
        raise ConfigError(f"gate_embedding: layout must be one of {EMBED_LAYOUTS[1:]}, got {layout!r}")
    if not input_shape:
        raise ConfigError("a gate embeds a (B, C, ...) or (B, ..., C) tensor; this block's input has no dim besides the batch")
    if layout == "channels_first":
        return GateEmbedding(input_shape[0], dims)
    return TokenGateEmbedding(input_shape[-1], dims)


class GateChoice(nn.Module):
    """softmax -> hard one-hot of the argmax (first index on ties) -> straight-through mask.

    Keeps the last forward's mask (with its autograd graph, for the cost term) and choice; the
    runtime reads them. `forward_count` tells the runtime whether it has seen this batch.
    """

    def __init__(self, table: CandidateTable):
        super().__init__()
        self.table = table
        self.last_mask: torch.Tensor | None = None
        self.forward_count = 0

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        p = F.softmax(logits, dim=1)
        hard = F.one_hot(p.detach().argmax(dim=1), p.shape[1]).to(p.dtype)
        mask = hard - p.detach() + p
        self.last_mask = mask
        self.forward_count += 1
        return mask

    @property
    def last_choice(self) -> torch.Tensor | None:
        """(B,) candidate index per sample of the last forward."""
        return None if self.last_mask is None else choice_of(self.last_mask)

    def __getstate__(self):  # deepcopy/pickle: the last batch's autograd graph does not travel
        state = super().__getstate__()
        state["last_mask"] = None
        return state

    def extra_repr(self) -> str:
        return f"candidates={self.table.labels}"


def choice_of(mask: torch.Tensor) -> torch.Tensor:
    """The candidate each sample chose: the argmax of its (one-hot in forward) mask row."""
    return mask.detach().argmax(dim=1)
