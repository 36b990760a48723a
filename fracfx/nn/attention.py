"""Multi-head attention written in the ops fracfx quantizes, reading nn.MultiheadAttention's parameters.

nn.MultiheadAttention runs one fused call (F.multi_head_attention_forward or a native kernel):
torch.fx keeps it a leaf and fracfx can neither see nor quantize what is inside. This module
computes the same function with plain ops:

    q, k, v = F.linear(query, Wq, bq), F.linear(key, Wk, bk), F.linear(value, Wv, bv)
    per head: scores = torch.matmul(q / sqrt(head_dim), k^T) (+ mask bias)
              out    = torch.matmul(dropout(softmax(scores)), v)
    output = F.linear(concat(heads), Wo, bo)

Wq, Wk, Wv are the three row blocks of in_proj_weight (or q/k/v_proj_weight when kdim/vdim
differ), so the parameters and their names are nn.MultiheadAttention's own. Q, K and V are three
linears rather than one packed linear so that each projection gets its own gradient quantizer
and range, as three separate layers would (the packed output's gradient mixes Q, K and V, whose
ranges differ). MACs are the same either way.

`multi_head_attention(m, ...)` takes anything with nn.MultiheadAttention's attributes: the
module itself, an `Attention`, or passes.replace_attention's view of graph values, which runs
this same function on torch.fx proxies to emit the ops into a graph.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fracfx.errors import ConfigError


def _graph_leaf(fn):
    """Run `fn` on tensors; on torch.fx proxies record one call_function node instead.

    Used for the mask helper: its body branches on dtypes and ranks, which exist only at run time.
    """

    @functools.wraps(fn)
    def leaf(*args, **kwargs):
        proxy = next((a for a in (*args, *kwargs.values()) if isinstance(a, fx.Proxy)), None)
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", leaf, args, kwargs)
        return fn(*args, **kwargs)

    return leaf


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = may not attend) as -inf/0, as nn.MultiheadAttention reads it; float masks add as they are."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise ConfigError(f"attention masks must be bool or float, got {mask.dtype}")
    return mask.to(dtype)


@_graph_leaf
def attention_bias(query, attn_mask, key_padding_mask, num_heads: int, extra_keys: int = 0):
    """The additive bias on the (..., heads, L, S) attention scores from nn.MultiheadAttention's masks.

    attn_mask: (L, S) or (N * num_heads, L, S); key_padding_mask: (N, S) ((S,) unbatched); either
    bool (True = masked) or float (added). extra_keys: keys appended after the real ones (bias_k,
    add_zero_attn), which no mask hides.
    """
    batched = query.dim() == 3
    bias = None
    if attn_mask is not None:
        bias = _additive(attn_mask, query.dtype)
        if bias.dim() == 3 and batched:
            bias = bias.unflatten(0, (-1, num_heads))  # (N*H, L, S) -> (N, H, L, S)
    if key_padding_mask is not None:
        pad = _additive(key_padding_mask, query.dtype)
        pad = pad[:, None, None, :] if batched else pad  # broadcast over heads and queries
        bias = pad if bias is None else bias + pad
    if bias is not None and extra_keys:
        bias = F.pad(bias, (0, extra_keys))
    return bias


def _projection_weights(m):
    if m._qkv_same_embed_dim:
        w = m.in_proj_weight.chunk(3)
        return w[0], w[1], w[2]
    return m.q_proj_weight, m.k_proj_weight, m.v_proj_weight


def _with_extra_key(t, row):
    """Append one key/value position (row broadcast over the batch) along the sequence axis (-2)."""
    return torch.cat([t, row.expand_as(t[..., :1, :])], dim=-2)


def multi_head_attention(
    m,
    query,
    key,
    value,
    key_padding_mask=None,
    need_weights: bool = True,
    attn_mask=None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    *,
    dropout=None,
):
    """nn.MultiheadAttention.forward of `m`, in traceable ops; returns (output, weights or None).

    Same arguments and results as nn.MultiheadAttention; `dropout` (a callable or None) is applied
    to the attention probabilities. is_causal is only a hint there: the mask itself is applied.
    """
    if is_causal and attn_mask is None:
        raise ConfigError("is_causal=True needs attn_mask too (as in nn.MultiheadAttention); pass the causal mask")
    if not m.batch_first:  # work batch first, (..., L, E): (L, N, E) -> (N, L, E); unbatched (L, E) unchanged
        query, key, value = query.transpose(0, -2), key.transpose(0, -2), value.transpose(0, -2)
    w_q, w_k, w_v = _projection_weights(m)
    b_q = b_k = b_v = None
    if m.in_proj_bias is not None:
        b = m.in_proj_bias.chunk(3)
        b_q, b_k, b_v = b[0], b[1], b[2]
    q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    extra_keys = 0
    if m.bias_k is not None:  # learned extra key and value, after the projections
        k, v = _with_extra_key(k, m.bias_k.flatten()), _with_extra_key(v, m.bias_v.flatten())
        extra_keys += 1
    q, k, v = (t.unflatten(-1, (m.num_heads, m.head_dim)).transpose(-3, -2) for t in (q, k, v))  # (..., H, L, hd)
    if m.add_zero_attn:
        k, v = torch.cat([k, torch.zeros_like(k[..., :1, :])], dim=-2), torch.cat([v, torch.zeros_like(v[..., :1, :])], dim=-2)
        extra_keys += 1
    scores = torch.matmul(q * math.sqrt(1.0 / m.head_dim), k.transpose(-2, -1))
    if attn_mask is not None or key_padding_mask is not None:
        scores = scores + attention_bias(query, attn_mask, key_padding_mask, m.num_heads, extra_keys)
    probs = F.softmax(scores, dim=-1)
    if dropout is not None:
        probs = dropout(probs)
    out = torch.matmul(probs, v).transpose(-3, -2).flatten(-2)
    out = F.linear(out, m.out_proj.weight, m.out_proj.bias)
    if not m.batch_first:
        out = out.transpose(0, -2)
    if not need_weights:
        return out, None
    # nn.MultiheadAttention returns the probabilities after dropout, averaged over heads by default
    return out, (probs.mean(dim=-3) if average_attn_weights else probs)


class Attention(nn.MultiheadAttention):
    """nn.MultiheadAttention that torch.fx traces into: same constructor, parameters and state_dict keys.

    fracfx.transform does not need it (passes.replace_attention opens nn.MultiheadAttention in
    the graph); use it to write models whose attention is traceable from the start, or call
    Attention.from_module(mha) for one that shares an existing module's parameters.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, **kwargs):
        super().__init__(embed_dim, num_heads, dropout=dropout, **kwargs)
        # a module (not F.dropout(training=self.training)) so a traced graph still obeys train()/eval()
        self.attn_dropout = nn.Dropout(dropout)

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention) -> "Attention":
        """An Attention holding `mha`'s own parameters (shared, not copied)."""
        new = cls(
            mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim,
            vdim=mha.vdim, batch_first=mha.batch_first, device="meta",  # placeholders, replaced below
        )
        for name, param in mha.named_parameters(recurse=False):
            setattr(new, name, param)
        new.out_proj = mha.out_proj
        return new.train(mha.training)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
        return multi_head_attention(
            self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal,
            dropout=self.attn_dropout if self.dropout > 0 else None,
        )
