"""Float (and shape-only) ops of the fast int8 format: one class runs in PyTorch and writes ONNX.

Values may be float32 or uint8 codes (max pooling and flatten act on codes unchanged); see
fracfx.export.int8_ops for the integer ops and the reference that runs them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from fracfx.export.int8_ops import Builder, _pair


@dataclasses.dataclass
class Float:
    """A float (or shape/order-only) op: `kind` picks both the torch call and the ONNX node."""

    kind: str  # add | mul | relu | clip | maxpool | gap | flatten | gemm | conv | affine | identity
    inputs: list
    out: str
    params: dict = dataclasses.field(default_factory=dict)

    def run(self, env):
        a, p = [env[i] for i in self.inputs], self.params
        k = self.kind
        if k == "add":
            y = a[0] + a[1]
        elif k == "mul":
            y = a[0] * a[1]
        elif k == "relu":
            y = torch.relu(a[0])
        elif k == "clip":
            y = torch.clamp(a[0], p["min"], p["max"])
        elif k == "maxpool":
            y = F.max_pool2d(a[0], p["kernel"], p["stride"], p["padding"], p["dilation"], p["ceil_mode"])
        elif k == "gap":
            y = a[0].mean(dim=(2, 3), keepdim=True)
        elif k == "flatten":
            y = torch.flatten(a[0], p["axis"])
        elif k == "gemm":
            y = F.linear(a[0], p["weight"], p.get("bias"))
        elif k == "conv":
            y = F.conv2d(a[0], p["weight"], p.get("bias"), p["stride"], p["padding"], p["dilation"], p["groups"])
        elif k == "affine":
            y = torch.add(torch.mul(a[0], p["scale"]), p["shift"])
        else:
            y = a[0]
        env[self.out] = y

    def emit(self, b: Builder):
        p, k, ins = self.params, self.kind, list(self.inputs)
        if k in ("add", "mul"):
            b.node(k.capitalize(), ins, self.out)
        elif k == "relu":
            b.node("Relu", ins, self.out)
        elif k == "clip":
            b.node("Clip", ins + [b.const(np.float32(p["min"]), "lo"), b.const(np.float32(p["max"]), "hi")], self.out)
        elif k == "maxpool":
            (kh, kw), (sh, sw), (ph, pw), dil = _pair(p["kernel"]), _pair(p["stride"]), _pair(p["padding"]), _pair(p["dilation"])
            b.node("MaxPool", ins, self.out, kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw],
                   dilations=list(dil), ceil_mode=int(p["ceil_mode"]))
        elif k == "gap":
            b.node("GlobalAveragePool", ins, self.out)
        elif k == "flatten":
            b.node("Flatten", ins, self.out, axis=p["axis"])
        elif k == "gemm":
            extra = [] if p.get("bias") is None else [b.const(p["bias"].detach().float().numpy(), "bias")]
            b.node("Gemm", ins + [b.const(p["weight"].detach().float().numpy(), "w")] + extra, self.out, transB=1)
        elif k == "conv":
            (ph, pw) = _pair(p["padding"])
            extra = [] if p.get("bias") is None else [b.const(p["bias"].detach().float().numpy(), "bias")]
            b.node("Conv", ins + [b.const(p["weight"].detach().float().numpy(), "w")] + extra, self.out,
                   strides=list(_pair(p["stride"])), pads=[ph, pw, ph, pw], dilations=list(_pair(p["dilation"])),
                   group=p["groups"], kernel_shape=list(p["weight"].shape[2:]))
        elif k == "affine":
            y = b.node("Mul", ins + [b.const(p["scale"].float().numpy(), "a")])
            b.node("Add", [y, b.const(p["shift"].float().numpy(), "c")], self.out)
        else:
            b.node("Identity", ins, self.out)
