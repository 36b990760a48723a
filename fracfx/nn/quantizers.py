"""The nn.Modules that passes insert into graphs and the runtime drives.

Bits live in an int64 buffer (so they travel with state_dict() and .to()) mirrored by a Python
int (so forward never syncs a device to read them). Change them with set_bits(); the mirror is
refreshed after load_state_dict(). Bits 0 means FP32: forward returns its input untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from fracfx.bits import FP32, check_bits
from fracfx.nn.quant import FakeQuantSTE, GradQuantFn, channel_range, grid_of, qmax_of, tensor_range


def _refresh_bits_mirror(module: "_Quantizer", incompatible_keys) -> None:
    module._bits = int(module.bits)


class _Quantizer(nn.Module):
    """Holds the bit width; subclasses say what they quantize."""

    def __init__(self, bits: int | None):
        super().__init__()
        bits = check_bits(bits, f"{type(self).__name__} bits")
        self.register_buffer("bits", torch.tensor(bits, dtype=torch.int64))
        self._bits = bits
        self.register_load_state_dict_post_hook(_refresh_bits_mirror)

    @property
    def current_bits(self) -> int:
        """The bit width in force (0 = FP32)."""
        return self._bits

    def set_bits(self, bits: int | None) -> None:
        bits = check_bits(bits, f"{type(self).__name__} bits")
        self.bits.fill_(bits)
        self._bits = bits

    def extra_repr(self) -> str:
        grid = ", integer_zero_point=True" if getattr(self, "integer_zero_point", False) else ""
        return f"bits={self._bits or 'fp32'}{grid}"


class ActQuant(_Quantizer):
    """Activation fake quant: per-tensor batch min/max in training, running ranges in eval.

    `range_sync` (None, or fracfx.runtime.sync_stats.RangeSync) takes the training range over
    every rank of a data-parallel run instead of this process's share of the batch.
    """

    range_sync = None

    def __init__(self, bits: int | None = 8, momentum: float = 0.9, integer_zero_point: bool = False):
        super().__init__(bits)
        self.momentum = float(momentum)
        self.integer_zero_point = bool(integer_zero_point)
        self.register_buffer("running_lo", torch.zeros(()))
        self.register_buffer("running_range", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            lo, rng = tensor_range(x) if self.range_sync is None else self.range_sync.tensor_range(x)
            self._track(lo, rng)
        else:
            lo, rng = self.running_lo, self.running_range
        if self._bits == FP32:
            return x
        lo, step = grid_of(lo, rng, self._bits, self.integer_zero_point)
        return FakeQuantSTE.apply(x, lo, step, qmax_of(self._bits))

    @torch.no_grad()
    def _track(self, lo: torch.Tensor, rng: torch.Tensor) -> None:
        m = self.momentum
        self.running_lo.mul_(m).add_(lo.to(self.running_lo.dtype), alpha=1 - m)
        self.running_range.mul_(m).add_(rng.to(self.running_range.dtype), alpha=1 - m)


class WeightQuant(_Quantizer):
    """Weight fake quant per output channel (axis 0), from the live FP32 weight every forward."""

    def __init__(self, bits: int | None = 8, axis: int = 0, integer_zero_point: bool = False):
        super().__init__(bits)
        self.axis = axis
        self.integer_zero_point = bool(integer_zero_point)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self._bits == FP32:
            return w
        lo, rng = channel_range(w, self.axis)
        lo, step = grid_of(lo, rng, self._bits, self.integer_zero_point)
        return FakeQuantSTE.apply(w, lo, step, qmax_of(self._bits))


class GradQuant(_Quantizer):
    """Identity in forward; quantizes the op's output gradient in backward (stochastic rounding).

    Owns a torch.Generator for the rounding noise. Its state is part of state_dict() (extra
    state), so a resumed run draws exactly the noise an uninterrupted one would have drawn.
    `range_sync` (as ActQuant's) takes the gradient's range over every rank.
    """

    range_sync = None

    def __init__(self, bits: int | None = 8, stochastic: bool = True, seed: int = 0, copy_output: bool = True):
        super().__init__(bits)
        self.stochastic = bool(stochastic)
        self.copy_output = bool(copy_output)  # False only when no consumer writes in place
        self._generator = torch.Generator().manual_seed(seed)

    def generator_for(self, device: torch.device) -> torch.Generator:
        """The rounding generator on `device` (moved there, state kept, on first use)."""
        if self._generator.device.type != device.type:
            moved = torch.Generator(device=device)
            moved.manual_seed(self._generator.initial_seed())
            self._generator = moved
        return self._generator

    def seed(self, seed: int) -> None:
        self._generator.manual_seed(seed)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self._bits == FP32 or not y.requires_grad:
            return y
        return GradQuantFn.apply(y, qmax_of(self._bits), self.generator_for(y.device), self.stochastic, None, None, self.copy_output,
                                 self.range_sync)

    def get_extra_state(self):
        return {"device": self._generator.device.type, "state": self._generator.get_state()}

    def set_extra_state(self, state) -> None:
        device = torch.device(state["device"])
        if self._generator.device.type != device.type:
            self._generator = torch.Generator(device=device)
        self._generator.set_state(state["state"])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stochastic={self.stochastic}"


QUANTIZER_TYPES = (ActQuant, WeightQuant, GradQuant)
