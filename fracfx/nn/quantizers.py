"""The nn.Modules that passes insert into graphs and the runtime drives.

Bits live in an int64 buffer (so they travel with state_dict() and .to()) mirrored by a Python
int (so forward never syncs a device to read them). Change them with set_bits(); the mirror is
refreshed after load_state_dict(). Bits 0 means FP32: forward returns its input untouched.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from fracfx.bits import FP32, check_bits
from fracfx.nn.quant import (FakeQuantSTE, GradQuantFn, act_fake_quant, channel_range, counter_snapshot, fused_kernels_enabled, grid_of, qmax_of,
                             tensor_range)


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
        fused_kernels_enabled()  # load (or build) the fused kernels now, not inside a torch.compile trace

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


def observed_range(quantizer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (lo, R) an activation quantizer uses: in training the batch's own range (over every
    rank with `range_sync`), also averaged into its running_lo / running_range buffers with its
    momentum; in evaluation those running averages."""
    if not quantizer.training:
        return quantizer.running_lo, quantizer.running_range
    lo, rng = tensor_range(x) if quantizer.range_sync is None else quantizer.range_sync.tensor_range(x)
    with torch.no_grad():
        m = quantizer.momentum
        quantizer.running_lo.mul_(m).add_(lo.to(quantizer.running_lo.dtype), alpha=1 - m)
        quantizer.running_range.mul_(m).add_(rng.to(quantizer.running_range.dtype), alpha=1 - m)
    return lo, rng


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
        lo, rng = observed_range(self, x)
        if self._bits == FP32:
            return x
        lo, step = grid_of(lo, rng, self._bits, self.integer_zero_point)
        return act_fake_quant(x, lo, step, qmax_of(self._bits))



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

    The rounding noise is counter based (fracfx.nn.quant.rounding_noise): a pure function of this
    quantizer's seed, its call counter and the element index. The counter (`noise_counter`, an
    int64 buffer) advances by one per training forward whose output needs a gradient, so it is in
    state_dict() and a resumed run regenerates exactly the noise an uninterrupted one would have;
    the seed is extra state (a rank-specific value in data-parallel runs, kept out of the buffers
    that ranks compare). `range_sync` (as ActQuant's) takes the gradient's range over every rank.
    """

    range_sync = None

    def __init__(self, bits: int | None = 8, stochastic: bool = True, seed: int = 0, copy_output: bool = True):
        super().__init__(bits)
        self.stochastic = bool(stochastic)
        self.copy_output = bool(copy_output)  # False only when no consumer writes in place
        self._seed = int(seed)
        self.register_buffer("noise_counter", torch.zeros((), dtype=torch.int64))

    @property
    def noise_seed(self) -> int:
        return self._seed

    def seed(self, seed: int) -> None:
        """Start the rounding noise stream of `seed` (the counter restarts at 0)."""
        self._seed = int(seed)
        self.noise_counter.zero_()

    def _next_counter(self) -> torch.Tensor:
        # counter_snapshot, not clone(), and copy_, not add_(1): under torch.compile (torch 2.14)
        # both `clone(); buffer.add_(1)` (aot_eager) and `clone(); buffer.copy_(clone + 1)`
        # (inductor) hand the backward the incremented value (tests/nn/test_compile.py checks
        # compiled == eager on both backends)
        counter = counter_snapshot(self.noise_counter)
        self.noise_counter.copy_(counter + 1)
        return counter

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self._bits == FP32 or not (y.requires_grad and torch.is_grad_enabled()):
            return y  # no backward will run: the counter stays
        return GradQuantFn.apply(y, qmax_of(self._bits), self._next_counter(), self._seed, self.stochastic, None, None, self.copy_output,
                                 self.range_sync)

    def get_extra_state(self):
        return {"seed": self._seed}

    def set_extra_state(self, state) -> None:
        if "seed" not in state:  # a checkpoint from before counter-based noise (torch.Generator state)
            warnings.warn("GradQuant: this checkpoint holds a torch.Generator state from an older fracfx; the rounding noise is now "
                          "counter based, so this run keeps its own seed (the noise will differ from the original run's)",
                          RuntimeWarning, stacklevel=2)
            return
        self._seed = int(state["seed"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "noise_counter"
        if key not in state_dict and prefix + "_extra_state" in state_dict and "seed" not in (state_dict[prefix + "_extra_state"] or {}):
            state_dict[key] = torch.zeros((), dtype=torch.int64)  # older checkpoint: the noise restarts (set_extra_state warns)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stochastic={self.stochastic}"


QUANTIZER_TYPES = (ActQuant, WeightQuant, GradQuant)
