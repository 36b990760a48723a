"""Narrowing the new 8-bit grids of the fast int8 format where a wider range cannot change the output.

A new grid (int8_plan.new_points) holds a branch r that the trained model keeps in float until

    y = clamp(r + s, L, U)     the residual add, the ReLU after it (L = 0) and the activation
                               quantizers that read the sum (U: the largest value their grids hold)

Where r + s leaves [L, U] the output is L or U whatever r is, so r matters only on
[L - max s, U - min s]: clipping r to that interval changes no output (up to the grid's own
rounding). `narrow` intersects each new grid's range (BatchNorm or calibration) with it, so the
same 255 steps cover less: a finer grid, a smaller rounding error, for free. s's range comes from
what the graph fixes: a quantizer's codes, another new grid, sums and clamps of such values;
where it is unbounded (a float nobody clamps) that side of the interval stays open.
"""

from __future__ import annotations

import math

import torch.fx as fx

from fracfx.export.int8_plan import (
    _ADD, _FLATTEN, _IDENTITY_MODULES, _clamp_bounds, _module, _quantized_conv, _quantizer_users, conv_chain, target_grid,
)
from fracfx.nn.frozen import FrozenActQuant

INF = math.inf
_PASS_THROUGH = ("MaxPool2d",)  # monotone ops that keep their input's range


def _grid_range(scale: float, zp: int, lo: int = 0, hi: int = 255) -> tuple[float, float]:
    return ((lo - zp) * scale, (hi - zp) * scale)


def _clamp(r: tuple[float, float], bounds: tuple[float, float]) -> tuple[float, float]:
    a, b = bounds
    return (min(max(r[0], a), b), max(min(r[1], b), a))


class _Ranges:
    """The range each value of a frozen graph can take, as far as its grids and clamps fix it."""

    def __init__(self, gm: fx.GraphModule, ranges: dict):
        self.gm, self.ranges, self.memo = gm, ranges, {}
        self.ends = {}  # end of a quantized conv chain -> its clamps
        for node in gm.graph.nodes:
            if _quantized_conv(gm, node):
                _, clamps, _, end = conv_chain(gm, node)
                self.ends[end.name] = clamps

    def of(self, node) -> tuple[float, float]:
        if not isinstance(node, fx.Node):
            return (float(node), float(node)) if isinstance(node, (int, float)) else (-INF, INF)
        if node.name not in self.memo:
            self.memo[node.name] = self._compute(node)
        return self.memo[node.name]

    def _compute(self, node: fx.Node) -> tuple[float, float]:
        gm, m = self.gm, _module(self.gm, node)
        if node.name in self.ends:  # a QLinearConv writes codes on a grid: a new one, or a quantizer's
            grid, _ = target_grid(gm, node, self.ranges)
            out = _grid_range(grid.scale, grid.zp)
            for bounds in self.ends[node.name]:
                out = _clamp(out, bounds)
            return out
        if isinstance(m, FrozenActQuant):
            return _grid_range(float(m.scale), int(m.zero_point), 0, m.qmax)
        bounds = _clamp_bounds(gm, node)
        if bounds is not None:
            return _clamp(self.of(node.args[0]), bounds)
        if isinstance(m, _IDENTITY_MODULES) or type(m).__name__ in _PASS_THROUGH or (node.op == "call_function" and node.target in _FLATTEN):
            return self.of(node.args[0])
        if node.op == "call_function" and node.target in _ADD and len(node.args) >= 2:
            (a, b), (c, d) = self.of(node.args[0]), self.of(node.args[1])
            return (a + c, b + d)
        return (-INF, INF)


def _output_clamp(gm, add: fx.Node) -> tuple[float, float]:
    """[L, U] the sum is clamped to before anything else reads it (module docstring)."""
    low, high, value = -INF, INF, add
    if len(value.users) == 1 and _clamp_bounds(gm, next(iter(value.users))) is not None:
        value = next(iter(value.users))
        low, high = _clamp_bounds(gm, value)
    quants = _quantizer_users(gm, value)
    if quants and len(quants) == len(value.users):  # every reader clamps to its grid
        low = max(low, min(_grid_range(float(q.scale), int(q.zero_point), 0, q.qmax)[0] for q in quants))
        high = min(high, max(_grid_range(float(q.scale), int(q.zero_point), 0, q.qmax)[1] for q in quants))
    return low, high


def narrow(gm: fx.GraphModule, ranges: dict) -> dict:
    """`ranges` (new grid name -> (lo, hi)) with each residual branch's range cut to where it can matter."""
    known = _Ranges(gm, ranges)
    nodes = {node.name: node for node in gm.graph.nodes}
    out = dict(ranges)
    for name, (lo, hi) in ranges.items():
        node = nodes[name]
        if len(node.users) != 1:
            continue
        add = next(iter(node.users))
        if not (add.op == "call_function" and add.target in _ADD and len(add.args) >= 2 and node in add.args[:2]):
            continue
        other = add.args[1] if add.args[0] is node else add.args[0]
        s_lo, s_hi = known.of(other)
        low, high = _output_clamp(gm, add)
        new_lo, new_hi = max(lo, low - s_hi), min(hi, high - s_lo)
        if new_lo < new_hi:
            out[name] = (new_lo, new_hi)
    return out
