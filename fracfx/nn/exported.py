"""Small modules that give an exported (torch.export) graph back its train/eval switch and its fused attention.

torch.export bakes the model's mode at capture time into ATen calls (`aten.batch_norm(...,
training=True, ...)`, `aten.dropout(x, p, train=True)`); fracfx.passes.lower_aten replaces those
calls with these modules so that `.train()` / `.eval()` on the transformed model switch them as
they switch nn.BatchNorm and nn.Dropout. Parameters and running statistics stay where the
exported graph reads them (get_attr of the original paths); the modules hold only constants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fracfx.bits import FP32
from fracfx.nn.quantizers import ActQuant, GradQuant


class ModeBatchNorm(nn.Module):
    """F.batch_norm on the graph's own parameters and running statistics, in the module's mode."""

    def __init__(self, momentum: float, eps: float):
        super().__init__()
        self.momentum, self.eps = momentum, eps

    def forward(self, x, weight, bias, running_mean, running_var) -> torch.Tensor:
        return F.batch_norm(x, running_mean, running_var, weight, bias, self.training, self.momentum, self.eps)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, eps={self.eps}"


def _off(quantizer: nn.Module) -> bool:
    # exact types: DFQ's mixed quantizers (per-sample bits) and frozen ones count as on, so those
    # models keep the decomposition (a frozen model is what ONNX computes, which has no fused SDPA)
    return type(quantizer) in (ActQuant, GradQuant) and quantizer.current_bits == FP32


class FusedAttention(nn.Module):
    """The end of a lowered scaled_dot_product_attention: the decomposition's output while any
    quantizer of its two products is on, F.scaled_dot_product_attention of the original
    arguments while all are off.

    lower_aten writes matmul(q, k^T) * scale -> softmax -> matmul(., v) so that the products can be
    quantized; eager CPU SDPA runs a fused flash kernel that no composition of ops reproduces bit
    for bit, and disabled quantization must equal the float model exactly. insert_quant appends the
    products' activation and gradient quantizers to the call (the nodes named in `products`); with
    none (not quantized, or before insert_quant) the fused op is always right. The check reads the
    quantizers' Python bit mirrors: no device sync, a constant torch.compile guards on, and bits
    set during training (PFQ) count from the next call. The decomposition runs either way (an fx
    graph runs every node), so its activation ranges are observed at bits 0 as everywhere else;
    the price is a second attention per call at bits 0 in eager mode (torch.compile drops what is
    unused), and, in training with attention dropout, the decomposition's dropout draws from the
    random stream before SDPA's, so only dropout-free forwards are bit-exact to the float model.
    """

    def __init__(self, products: tuple[str, str], dropout_p: float, is_causal: bool, scale: float | None):
        super().__init__()
        self.products = tuple(products)  # graph names of the QK^T and AV matmuls
        self.dropout_p, self.is_causal, self.scale = float(dropout_p), bool(is_causal), scale

    def forward(self, decomposed, query, key, value, attn_mask=None, *quantizers) -> torch.Tensor:
        if not all(_off(q) for q in quantizers):
            return decomposed
        dropout_p = self.dropout_p if self.training else 0.0  # export baked the mode; nn.Dropout's switch
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, self.is_causal, scale=self.scale)

    def extra_repr(self) -> str:
        return f"dropout_p={self.dropout_p}, is_causal={self.is_causal}, scale={self.scale}"
