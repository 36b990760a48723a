"""analyze_cost: bit-ops and effective MACs of a transformed graph (FRACTRAIN.md section 5).

Per op with M MACs per sample and bits a (activation), w (weight), g (gradient), FP32 = 32:
    forward bit-ops        M * a * w
    error-backprop bit-ops M * g * w
    weight-grad bit-ops    M * a * g
    effective MACs         M * (a*w + g*w + a*g) / 1024
`op_cost` is the pure formula; `analyze_cost` reads the bits in force from the quantizers.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from fracfx.bits import cost_bits
from fracfx.errors import ConfigError
from fracfx.meta import get_binding, get_op_cost, get_quant_spec

FP32_BITS = 32
SBM_BITS = 8  # static 8-bit training, the paper's baseline


@dataclasses.dataclass(frozen=True)
class OpCostRow:
    name: str
    module_path: str
    kind: str
    macs: int  # per sample
    act_bits: int  # as counted: FP32 = 32
    weight_bits: int
    grad_bits: int
    forward_bitops: int
    backprop_bitops: int
    wgrad_bitops: int

    @property
    def effective_macs(self) -> float:
        return (self.forward_bitops + self.backprop_bitops + self.wgrad_bitops) / (FP32_BITS * FP32_BITS)


def op_cost(name: str, module_path: str, kind: str, macs: int, a: int, w: int, g: int) -> OpCostRow:
    return OpCostRow(name, module_path, kind, macs, a, w, g, macs * a * w, macs * g * w, macs * a * g)


@dataclasses.dataclass(frozen=True)
class CostReport:
    """Per-op rows (per sample, one training step) and totals against FP32 and static 8-bit."""

    rows: tuple[OpCostRow, ...]

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.rows)

    @property
    def effective_macs(self) -> float:
        return sum(r.effective_macs for r in self.rows)

    @property
    def fp32_effective_macs(self) -> float:
        return 3.0 * self.macs

    @property
    def sbm_effective_macs(self) -> float:
        return self.macs * 3 * SBM_BITS * SBM_BITS / (FP32_BITS * FP32_BITS)

    @property
    def ratio_vs_fp32(self) -> float:
        return self.effective_macs / self.fp32_effective_macs if self.macs else 0.0

    @property
    def ratio_vs_sbm(self) -> float:
        return self.effective_macs / self.sbm_effective_macs if self.macs else 0.0

    def to_dict(self) -> dict:
        return {
            "rows": [dict(dataclasses.asdict(r), effective_macs=r.effective_macs) for r in self.rows],
            "macs": self.macs,
            "effective_macs": self.effective_macs,
            "fp32_effective_macs": self.fp32_effective_macs,
            "sbm_effective_macs": self.sbm_effective_macs,
            "ratio_vs_fp32": self.ratio_vs_fp32,
            "ratio_vs_sbm": self.ratio_vs_sbm,
        }


def _bits_of(gm: fx.GraphModule, target: str | None) -> int:
    return FP32_BITS if target is None else cost_bits(gm.get_submodule(target).current_bits)


def op_bits(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int, int]:
    """(a, w, g) in force for a compute node, FP32 counted as 32."""
    binding = get_binding(node)
    if binding is None:
        return FP32_BITS, FP32_BITS, FP32_BITS
    a = _bits_of(gm, binding.act[0])
    w = _bits_of(gm, binding.act[1]) if len(binding.act) > 1 else _bits_of(gm, binding.weight)
    return a, w, _bits_of(gm, binding.grad)


def analyze_cost(gm: fx.GraphModule) -> CostReport:
    rows = []
    for node in gm.graph.nodes:
        spec, cost = get_quant_spec(node), get_op_cost(node)
        if spec is None or spec.kind == "unsupported":
            continue
        if cost is None:
            raise ConfigError("MACs are unknown: pass example_inputs to fracfx.transform(...) so shapes can be traced")
        a, w, g = op_bits(gm, node)
        rows.append(op_cost(node.name, spec.module_path, spec.kind, cost.macs_per_sample, a, w, g))
    return CostReport(tuple(rows))
