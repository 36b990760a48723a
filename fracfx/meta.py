"""The only place fracfx's node.meta keys are spelled, with typed accessors.

Each analysis stores one frozen dataclass under one key, so passes can copy meta shallowly.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

# node.meta keys
QUANT_SPEC = "fracfx_quant"
OP_COST = "fracfx_cost"
QUANT_BINDING = "fracfx_binding"
INSERTED = "fracfx_inserted"
TRACE_LEAVES = "fracfx_trace_leaves"  # GraphModule.meta: modules kept as leaves after a trace failure
FROZEN = "fracfx_frozen"  # GraphModule.meta: tuple[FrozenQuant, ...] written by freeze_precision
BLOCK = "fracfx_block"  # BlockSpec on every compute node inside a gated block, and on its gate's mask node
BLOCK_PORTS = "fracfx_block_ports"  # tuple[BlockPort, ...] on the nodes that are a block's input/shortcut/output
SHAPE = "fracfx_shape"  # TensorShape on every node that produced a tensor on the example inputs
CAPTURED = "fracfx_captured"  # GraphModule.meta: "fx" (symbolic trace) or "export" (torch.export, ATen ops)
MODULE_STACK = "nn_module_stack"  # torch.fx's own: the module calls a node was traced inside

# every key the pass contract governs (fracfx.passes.infra.run_pipeline checks reads and writes)
NODE_KEYS = (QUANT_SPEC, OP_COST, QUANT_BINDING, INSERTED, BLOCK, BLOCK_PORTS, SHAPE, MODULE_STACK)
GRAPH_KEYS = (TRACE_LEAVES, FROZEN, CAPTURED)

# op kinds (QuantSpec.kind)
CONV, LINEAR, MATMUL = "conv", "linear", "matmul"
QUANTIZABLE_KINDS = (CONV, LINEAR, MATMUL)
UNSUPPORTED = "unsupported"  # a compute op fracfx cannot quantize: reported, kept FP32

# roles of inserted nodes (Inserted.role, FrozenQuant.role)
ACT_QUANT, WEIGHT_QUANT, GRAD_QUANT = "act_quant", "weight_quant", "grad_quant"
GATE_EMBED, GATE_STEP, GATE_STATE, GATE_HEAD, GATE_CHOICE = "gate_embed", "gate_step", "gate_state", "gate_head", "gate_choice"
GATE_ROLES = (GATE_EMBED, GATE_STEP, GATE_STATE, GATE_HEAD, GATE_CHOICE)  # the gate subgraph of a block
# BlockPort.role: the values of a gated block its gate and "skip" candidate need
PORT_INPUT, PORT_SHORTCUT, PORT_OUTPUT = "input", "shortcut", "output"
FP32_ROWS = "fp32_rows"  # DFQ "fp32" candidate: the op's float result for the samples that chose it
SKIP_MIX = "skip_mix"  # DFQ "skip" candidate: the block's shortcut for the samples that chose it
FUSED_ATTENTION = "fused_attention"  # a lowered SDPA's FusedAttention end (fused op while its products' quantizers are off)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Policy for one compute op: what it is and whether to quantize it (and if not, why)."""

    kind: str  # CONV | LINEAR | MATMUL | UNSUPPORTED
    module_path: str  # owning module's qualified name ("" for the root)
    module_type: str  # e.g. "Conv2d", or the function name for functional ops
    quantize: bool
    reason: str = ""  # why it stays FP32 when quantize is False


@dataclasses.dataclass(frozen=True)
class OpCost:
    """Multiply-accumulates of one op for one sample, from traced shapes."""

    macs_per_sample: int
    output_shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TensorShape:
    """The shape of the tensor a node produced when the graph ran on the example inputs.

    batch: the example inputs' batch size (dim 0 of the first tensor input), the same on every
    node, so a reader of one node can turn totals into per-sample values.
    """

    shape: tuple[int, ...]
    batch: int


@dataclasses.dataclass(frozen=True)
class QuantBinding:
    """Names (GraphModule submodule paths) of the quantizers attached to a compute op."""

    act: tuple[str, ...]
    weight: str | None
    grad: str


@dataclasses.dataclass(frozen=True)
class Inserted:
    """Marks a node a fracfx pass inserted: its role and the compute op it serves."""

    role: str  # one of the roles above
    serves: str  # name of the compute node


@dataclasses.dataclass(frozen=True)
class FrozenQuant:
    """One quantizer as freeze_precision fixed it (the numbers themselves live in the module).

    max_shift_steps: how far moving lo onto the integer zero-point grid moved the grid, in steps
    (max over the channels not widened; at most 0.5). extended: channels whose range did not
    contain 0 and was widened to include it; max_step_growth: their largest new step / old step
    (1.0 when none was widened).
    """

    target: str  # submodule path of the frozen quantizer
    role: str  # ACT_QUANT | WEIGHT_QUANT
    serves: str  # name of the compute node it feeds
    bits: int
    max_shift_steps: float
    extended: int
    max_step_growth: float = 1.0


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """A gated region (DFQ): one precision decision per sample applies to all its quantized ops.

    index: the gate's step along depth (execution order); input_shape: the block input's shape
    without the batch dimension (dim 0 is channels); residual: the block has a shortcut, so the
    "skip" candidate is defined for it.
    """

    index: int
    module_path: str
    module_type: str
    input_shape: tuple[int, ...]
    residual: bool


@dataclasses.dataclass(frozen=True)
class BlockPort:
    """Marks a node as a block's "input" (what its gate embeds), "shortcut" or "output" value."""

    role: str
    block: BlockSpec


def _getter(key: str):
    def get(node: fx.Node):
        return node.meta.get(key)

    return get


def _setter(key: str):
    def put(node: fx.Node, value) -> None:
        node.meta[key] = value

    return put


get_quant_spec, set_quant_spec = _getter(QUANT_SPEC), _setter(QUANT_SPEC)
get_op_cost, set_op_cost = _getter(OP_COST), _setter(OP_COST)
get_binding, set_binding = _getter(QUANT_BINDING), _setter(QUANT_BINDING)
get_inserted, set_inserted = _getter(INSERTED), _setter(INSERTED)
get_block, set_block = _getter(BLOCK), _setter(BLOCK)
get_shape, set_shape = _getter(SHAPE), _setter(SHAPE)


def get_block_ports(node: fx.Node) -> tuple[BlockPort, ...]:
    return node.meta.get(BLOCK_PORTS, ())


def add_block_port(node: fx.Node, port: BlockPort) -> None:
    node.meta[BLOCK_PORTS] = get_block_ports(node) + (port,)


def compute_nodes(graph: fx.Graph):
    """Nodes the policy looked at (quantized or kept FP32), in execution order."""
    return [n for n in graph.nodes if get_quant_spec(n) is not None]


def is_frozen(gm) -> bool:
    """True for the output of freeze_precision (and of fracfx.freeze)."""
    return isinstance(gm, fx.GraphModule) and FROZEN in gm.meta
