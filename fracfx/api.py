"""The public pipelines: straight lines of named passes.

set_bits and seed_rounding live in fracfx.nn.precision, the cost model in fracfx.cost_model (leaves
the runtime uses too); they are re-exported here as the public fracfx.set_bits, fracfx.cost_report.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from fracfx.config import DFQConfig, QuantConfig
from fracfx.cost_model import CostReport, analyze_cost
from fracfx.errors import ConfigError
from fracfx.meta import TRACE_LEAVES, compute_nodes, get_quant_spec
from fracfx.nn.precision import seed_rounding, set_bits
from fracfx.passes.annotate_blocks import annotate_blocks
from fracfx.passes.annotate_cost import annotate_cost
from fracfx.passes.annotate_quant import annotate_quant
from fracfx.passes.capture import capture_graph
from fracfx.passes.infra import Step, gate_choices, run_pipeline, step
from fracfx.passes.insert_gates import insert_gates
from fracfx.passes.insert_quant import insert_quant
from fracfx.passes.lower_aten import lower_aten
from fracfx.passes.pin_candidates import pin_candidates as _pin_candidates
from fracfx.passes.propagate_shapes import propagate_shapes
from fracfx.passes.replace_attention import replace_attention

Inputs = Sequence[torch.Tensor] | torch.Tensor | Mapping[str, Any] | None


def transform(
    model: nn.Module | torch.export.ExportedProgram,
    config: QuantConfig | DFQConfig | None = None,
    *,
    example_inputs: Inputs = None,
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace `model` and return a GraphModule with quantizer nodes; `model` is left untouched.

    example_inputs (a tensor or a tuple, batch first) lets fracfx trace shapes and count each
    op's MACs, which cost_report() and the DFQ cost term need. A dict is the model's keyword
    inputs (Hugging Face: example_inputs={"input_ids": ids}).

    Capture (config.capture, default "auto"): torch.fx symbolic tracing, or where the model's
    own forward cannot be traced, torch.export (needs example_inputs; the graph is then
    specialised to their shapes). `model` may also be a torch.export.ExportedProgram or the
    GraphModule its .module() returns.

    With a DFQConfig (example_inputs required), gated blocks are marked on the captured graph
    (annotate_blocks reads the model's own module structure, so it runs before insert_quant)
    and insert_gates adds the gate subgraphs after insert_quant; quantized ops outside every
    gated block get the static ungated_act_bits / ungated_grad_bits.
    """
    config = QuantConfig() if config is None else config
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(config, QuantConfig):
        return run_pipeline(model, quant_steps(config, example_inputs, concrete_args))
    if isinstance(config, DFQConfig):
        return run_pipeline(model, dfq_steps(config, example_inputs, concrete_args))
    raise ConfigError(f"config must be a fracfx QuantConfig or DFQConfig, got {type(config).__name__}")


def _capture_step(config: QuantConfig | DFQConfig, example_inputs: Inputs, concrete_args) -> Step:
    keywords = isinstance(example_inputs, Mapping)
    return step(capture_graph, leaf_modules=config.leaf_modules, concrete_args=concrete_args, fallback=config.trace_fallback,
                mode=config.capture, example_args=() if keywords or example_inputs is None else tuple(example_inputs),
                example_kwargs=dict(example_inputs) if keywords else None)


def quant_steps(config: QuantConfig, example_inputs: Inputs, concrete_args) -> list[Step]:
    """transform's pipeline for static (and PFQ) quantization."""
    return [
        _capture_step(config, example_inputs, concrete_args),
        step(lower_aten),
        step(replace_attention, keep=config.leaf_modules, when=config.replace_attention),
        step(annotate_quant, keep_fp32=config.keep_fp32, quantize=config.quantize),
        step(propagate_shapes, example_inputs=example_inputs, when=example_inputs is not None),
        step(annotate_cost, when=example_inputs is not None),
        step(insert_quant, act_bits=config.act_bits, weight_bits=config.weight_bits, grad_bits=config.grad_bits,
             act_momentum=config.act_momentum, stochastic_grad=config.stochastic_grad, integer_zero_point=config.integer_zero_point),
    ]


def dfq_steps(config: DFQConfig, example_inputs: Inputs, concrete_args) -> list[Step]:
    """transform's pipeline for DFQ: gated blocks, quantizers at the ungated bits, then the gates."""
    if example_inputs is None:
        raise ConfigError(
            "DFQConfig needs example_inputs (e.g. example_inputs=torch.randn(2, 3, 32, 32)): the gates are sized "
            "from the block inputs' shapes and the cost term counts each op's MACs"
        )
    return [
        _capture_step(config, example_inputs, concrete_args),
        step(lower_aten),
        step(replace_attention, keep=config.leaf_modules, when=config.replace_attention),
        step(annotate_quant, keep_fp32=config.keep_fp32, quantize=config.quantize),
        step(propagate_shapes, example_inputs=example_inputs),
        step(annotate_blocks, block_types=config.block_types, block_globs=config.block_globs),
        step(annotate_cost),
        step(insert_quant, act_bits=config.ungated_act_bits, weight_bits=config.weight_bits, grad_bits=config.ungated_grad_bits,
             act_momentum=config.act_momentum, stochastic_grad=config.stochastic_grad),
        step(insert_gates, candidates=config.candidates, embed_dims=config.embed_dims, hidden=config.hidden,
             embed_layout=config.embed_layout),
    ]


def pin_candidates(gm: fx.GraphModule, *, choices: dict[int, int]) -> fx.GraphModule:
    """A static copy of a DFQ model with gated block i fixed at candidate choices[i] (see
    fracfx.passes.pin_candidates); gate_choices(gm) maps block indices to their gates."""
    return run_pipeline(gm, [
        step(_pin_candidates, choices=choices),
    ])


def cost_report(gm: fx.GraphModule) -> CostReport:
    """Per-op and total MACs, bit-ops and effective MACs at the bits now in force."""
    return analyze_cost(gm)


@dataclasses.dataclass(frozen=True)
class Fp32Op:
    """A compute op (or opaque leaf module) that stays in FP32, and why."""

    node: str
    module_path: str
    op: str
    reason: str


def fp32_report(gm: fx.GraphModule) -> list[Fp32Op]:
    """Everything that computes in FP32 after transform: kept layers, unsupported ops, trace leaves."""
    found = []
    for node in compute_nodes(gm.graph):
        spec = get_quant_spec(node)
        if not spec.quantize:
            found.append(Fp32Op(node.name, spec.module_path, spec.module_type, spec.reason))
    for path in gm.meta.get(TRACE_LEAVES, ()):
        found.append(Fp32Op(path, path, "leaf", "could not be traced; kept as an FP32 leaf (trace_fallback)"))
    return found
