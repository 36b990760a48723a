"""The cost model of FracTrain training (docs/method.md section 5): bit-ops and effective MACs.

Per op with M MACs per sample and bits a (activation), w (weight), g (gradient), FP32 counted as
32 bits:

    forward bit-ops        M * a * w
    error-backprop bit-ops M * g * w
    weight-grad bit-ops    M * a * g
    effective MACs         M * (a*w + g*w + a*g) / FP32_BITOPS          (FP32_BITOPS = 32 * 32)

Baselines per sample over all compute ops (M = their MACs): FP32 training 3 * M effective MACs,
static 8-bit training (SBM, the paper's baseline) 3 * M * 8 * 8 / 1024.

Every constant and formula is here once: fracfx.cost_report (analyze_cost), the cost meters in
fracfx.runtime and the DFQ candidate table (fracfx.nn.gates) all use it. A leaf: it imports
only fracfx's other leaves.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch.fx as fx

from fracfx.bits import cost_bits
from fracfx.config import FP32_CANDIDATE, SKIP
from fracfx.errors import ConfigError
from fracfx.meta import UNSUPPORTED, QuantSpec, get_binding, get_op_cost, get_quant_spec

FP32_BITS = 32
FP32_BITOPS = FP32_BITS * FP32_BITS  # bit-ops of one FP32 multiply-accumulate
SBM_BITS = 8  # static 8-bit training, the paper's baseline


def step_bitops(a: int, w: int, g: int) -> int:
    """Bit-ops per MAC of one training step (forward, error backprop, weight gradient)."""
    return a * w + g * w + a * g


def fp32_effective_macs(macs: float) -> float:
    """Effective MACs of FP32 training on `macs` MACs (forward + two backward products)."""
    return 3.0 * macs


def sbm_effective_macs(macs: float) -> float:
    """Effective MACs of static 8-bit training on `macs` MACs."""
    return macs * step_bitops(SBM_BITS, SBM_BITS, SBM_BITS) / FP32_BITOPS


def ratio(value: float, baseline: float) -> float:
    """value / baseline, 0 for an empty baseline (nothing counted yet)."""
    return value / baseline if baseline else 0.0


def candidate_bitops(entry, weight_bits: int | None) -> int:
    """Bit-ops per MAC of one DFQ candidate ("skip", "fp32" or (a, g)); see CandidateTable.bitops.

    weight_bits: the op's own weight quantizer's bits (0 = FP32), or None for an op whose second
    operand is an activation at the candidate's bits (matmul). "fp32" runs the weights
    unquantized too, so it costs 3 * 32 * 32 whatever weight_bits is; "skip" costs 0.
    """
    if entry == SKIP:
        return 0
    if entry == FP32_CANDIDATE:
        return step_bitops(FP32_BITS, FP32_BITS, FP32_BITS)
    a, g = cost_bits(entry[0]), cost_bits(entry[1])
    w = a if weight_bits is None else cost_bits(weight_bits)
    return step_bitops(a, w, g)


def _bits_of(gm: fx.GraphModule, target: str | None) -> int:
    return FP32_BITS if target is None else cost_bits(gm.get_submodule(target).current_bits)


def op_bits(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int, int]:
    """(a, w, g) in force for a compute node, FP32 counted as 32 (read from its quantizers)."""
    binding = get_binding(node)
    if binding is None:
        return FP32_BITS, FP32_BITS, FP32_BITS
    a = _bits_of(gm, binding.act[0])
    w = _bits_of(gm, binding.act[1]) if len(binding.act) > 1 else _bits_of(gm, binding.weight)
    return a, w, _bits_of(gm, binding.grad)


def priced_ops(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, QuantSpec, int]]:
    """(node, spec, MACs per sample) of every op the cost model counts, in execution order."""
    for node in gm.graph.nodes:
        spec = get_quant_spec(node)
        if spec is None or spec.kind == UNSUPPORTED:
            continue
        cost = get_op_cost(node)
        if cost is None:
            raise ConfigError("MACs are unknown: pass example_inputs to fracfx.transform(...) so shapes can be traced")
        yield node, spec, cost.macs_per_sample


class Totals:
    """Effective MACs against the two baselines; a subclass provides effective_macs,
    fp32_effective_macs and sbm_effective_macs (a report per sample, a meter accumulated)."""

    effective_macs: float
    fp32_effective_macs: float
    sbm_effective_macs: float

    @property
    def ratio_vs_fp32(self) -> float:
        return ratio(self.effective_macs, self.fp32_effective_macs)

    @property
    def ratio_vs_sbm(self) -> float:
        return ratio(self.effective_macs, self.sbm_effective_macs)

    def totals(self) -> dict[str, float]:
        return {
            "effective_macs": self.effective_macs,
            "fp32_effective_macs": self.fp32_effective_macs,
            "sbm_effective_macs": self.sbm_effective_macs,
            "ratio_vs_fp32": self.ratio_vs_fp32,
            "ratio_vs_sbm": self.ratio_vs_sbm,
        }


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
        return (self.forward_bitops + self.backprop_bitops + self.wgrad_bitops) / FP32_BITOPS


def op_cost(name: str, module_path: str, kind: str, macs: int, a: int, w: int, g: int) -> OpCostRow:
    return OpCostRow(name, module_path, kind, macs, a, w, g, macs * a * w, macs * g * w, macs * a * g)


@dataclasses.dataclass(frozen=True)
class CostReport(Totals):
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
        return fp32_effective_macs(self.macs)

    @property
    def sbm_effective_macs(self) -> float:
        return sbm_effective_macs(self.macs)

    def to_dict(self) -> dict:
        return {
            "rows": [dict(dataclasses.asdict(r), effective_macs=r.effective_macs) for r in self.rows],
            "macs": self.macs,
            **self.totals(),
        }


def analyze_cost(gm: fx.GraphModule) -> CostReport:
    """Per-op and total MACs, bit-ops and effective MACs of a transformed graph at the bits in force."""
    rows = []
    for node, spec, macs in priced_ops(gm):
        a, w, g = op_bits(gm, node)
        rows.append(op_cost(node.name, spec.module_path, spec.kind, macs, a, w, g))
    return CostReport(tuple(rows))
