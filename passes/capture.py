"""capture_graph: nn.Module -> GraphModule, by torch.fx symbolic tracing or by torch.export.

mode="fx" traces symbolically (module calls stay nodes, any batch size afterwards); mode="export"
captures with torch.export.export(model, args, kwargs, strict=False) and unlifts the program
(ExportedProgram.module()): an ATen-level graph, parameters as get_attr nodes of their original
paths, each op's module path in node.meta["nn_module_stack"], inputs and outputs with the
model's own structure (keyword inputs, dict or dataclass outputs), shapes specialised to the
example inputs. mode="auto" traces with fx and, where fx fails (the root forward of Hugging Face
models: keyword inputs, output dataclasses, control flow on the config) and example inputs are
given, uses torch.export; when both fail, one error names both failures and the fixes. An
ExportedProgram, or the GraphModule its .module() returns, is accepted as it is. The model's
mode is baked into ATen batch_norm/dropout calls: fracfx.passes.lower_aten gives them back their
train/eval switch.

A subclass of nn.Conv1d/2d/3d or nn.Linear whose own forward cannot be traced (timm's
Conv2dSame pads with Python arithmetic on the input size) becomes a call_module leaf without
fallback: annotate_quant and insert_quant still quantize its input, weight and gradient.

The model is deep-copied first, so nothing a later pass or training does touches the caller's
model. A trace failure names the innermost module being traced, the source line, and the fixes;
with fallback=True that module is kept as an opaque leaf instead, and the leaves are recorded in
gm.meta[TRACE_LEAVES] so the transform can report what stayed unquantized.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import os
import traceback
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from fracfx.errors import UnsupportedGraphError
from fracfx.meta import CAPTURED, MODULE_STACK, TRACE_LEAVES
from fracfx.passes.infra import copy_graph, graph_module, graph_pass, rebuild

FX, EXPORT, AUTO = "fx", "export", "auto"
# subclasses whose own forward cannot be traced stay call_module leaves, quantized by insert_quant
_WEIGHTED_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

_MAX_FALLBACKS = 64
_TRACING_CODE = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))


class _CaptureTracer(fx.Tracer):
    def __init__(self, leaf_names: Sequence[str]):
        super().__init__()
        self.leaf_names = set(leaf_names)
        self.failed_module: tuple[str, nn.Module] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or type(m).__name__ in self.leaf_names:
            return True
        return super().is_leaf_module(m, qualname) or _switches_on_training(m)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # innermost module first, as the exception unwinds
                self.failed_module = (self.path_of_module(m), m)
            raise


@graph_pass(writes=(MODULE_STACK, TRACE_LEAVES, CAPTURED))
def capture_graph(
    model: nn.Module,
    /,
    *,
    leaf_modules: Sequence[str] = (),
    concrete_args: dict[str, Any] | None = None,
    fallback: bool = False,
    mode: str = FX,
    example_args: Sequence[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace `model` (or copy an already traced GraphModule) into a fresh GraphModule."""
    if isinstance(model, torch.export.ExportedProgram):
        return _from_exported(model.module())
    if not isinstance(model, nn.Module):
        raise UnsupportedGraphError(f"expected a torch.nn.Module or a torch.export.ExportedProgram, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule):
        if _is_exported(model):
            return _from_exported(_deepcopy(model))
        graph, _ = copy_graph(model)
        out = rebuild(_deepcopy(model), graph)
        out.meta.setdefault(CAPTURED, FX)
        return out
    if mode not in (FX, EXPORT, AUTO):
        raise UnsupportedGraphError(f"capture mode {mode!r} is not one of {(FX, EXPORT, AUTO)}")
    model = _deepcopy(model)
    if mode == EXPORT:
        return _export(model, example_args, example_kwargs, None)
    try:
        return _trace(model, leaf_modules, concrete_args, fallback)
    except UnsupportedGraphError as error:
        if mode == FX:
            raise
        return _export(model, example_args, example_kwargs, error)


def _trace(model: nn.Module, leaf_modules: Sequence[str], concrete_args, fallback: bool) -> fx.GraphModule:
    leaves = list(leaf_modules)
    skipped: list[str] = []
    for _ in range(_MAX_FALLBACKS):
        tracer = _CaptureTracer(leaves)
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
        except Exception as error:
            path = tracer.failed_module[0] if tracer.failed_module else ""
            if path and isinstance(tracer.failed_module[1], _WEIGHTED_MODULES) and path not in leaves:
                leaves.append(path)  # a conv/linear subclass (timm's Conv2dSame): a leaf that is still quantized
                continue
            if not fallback or not path:
                raise UnsupportedGraphError(_explain(error, tracer.failed_module)) from error
            leaves.append(path)
            skipped.append(path)
            continue
        gm = graph_module(tracer.root, graph)
        gm.meta[TRACE_LEAVES] = tuple(skipped)
        gm.meta[CAPTURED] = FX
        return gm
    raise UnsupportedGraphError(f"gave up after keeping {_MAX_FALLBACKS} modules as leaves: {skipped}")


def _export(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any] | None, fx_error: Exception | None) -> fx.GraphModule:
    """torch.export (non-strict, training IR) of the deep-copied model; one error for both paths."""
    tried = f"{fx_error}\n" if fx_error is not None else ""
    if not args and not kwargs:
        raise UnsupportedGraphError(
            f"{tried}torch.export needs example inputs to capture the model: pass example_inputs to fracfx.transform "
            "(a tensor, a tuple of positional inputs, or a dict of keyword inputs such as {'input_ids': ids})"
        )
    try:
        with _intra_op_threads(1):  # capture is dispatch-bound; a thread pool per tiny op only costs
            program = _export_batch_dynamic(model, tuple(args), dict(kwargs or {}))
    except Exception as error:
        reason = str(error).strip().splitlines()
        reason = reason[0] if reason else ""
        raise UnsupportedGraphError(
            f"{tried}torch.export could not capture {type(model).__name__} either: {type(error).__name__}: {reason}\n"
            "  fix: make forward traceable (or mark the failing module a leaf), pass example_inputs the model accepts, "
            "return tensors, tuples, dicts or pytree-registered dataclasses (Hugging Face: config.use_cache=False), and "
            "avoid data-dependent Python control flow (torch.cond), or capture it yourself and pass the ExportedProgram"
        ) from error
    return _from_exported(program.module())


def _batch_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """torch.export's dynamic_shapes, by argument name: dim 0 (the batch) of every input tensor is
    Dim.AUTO (dynamic unless the model ties it to a constant; then torch.export specialises it).
    An example batch of 1 stays static: torch.export specialises sizes 0 and 1 anyway."""
    from torch.export import Dim

    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    batch = lambda leaf: {0: Dim.AUTO} if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] > 1 else None  # noqa: E731
    return {name: torch.utils._pytree.tree_map(batch, value) for name, value in bound.arguments.items()}


def _export_batch_dynamic(model: nn.Module, args: tuple, kwargs: dict):
    """torch.export with a dynamic batch, so the captured model (and its ONNX export) runs at any
    batch size; a model that torch.export cannot capture that way is captured at the example shapes."""
    try:
        shapes = _batch_dynamic_shapes(model, args, kwargs)
        return torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=shapes, strict=False)
    except Exception:  # e.g. *args/**kwargs in forward, or a guard torch.export cannot express
        return torch.export.export(model, args, kwargs=kwargs, strict=False)


def _is_exported(gm: fx.GraphModule) -> bool:
    return gm.meta.get(CAPTURED) == EXPORT or any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)


def _from_exported(gm: fx.GraphModule) -> fx.GraphModule:
    """A fracfx GraphModule of an unlifted exported program, without its input-shape guard."""
    graph, _ = copy_graph(gm)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)
    out = rebuild(gm, graph)
    out.meta[TRACE_LEAVES] = ()
    out.meta[CAPTURED] = EXPORT
    return out


def _deepcopy(model: nn.Module) -> nn.Module:
    """copy.deepcopy on one intra-op thread: copying parameters is memory-bound, and on a busy
    machine the fork/join of a thread pool per tensor made it ~25x slower (resnet50: 0.66 s with
    2 threads against 0.025 s with 1, measured on a loaded 2-core machine)."""
    with _intra_op_threads(1):
        return copy.deepcopy(model)


@contextlib.contextmanager
def _intra_op_threads(count: int):
    previous = torch.get_num_threads()
    if previous != count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if previous != count:
            torch.set_num_threads(previous)


_COMPUTE_NAMES = {"Conv1d", "Conv2d", "Conv3d", "Linear", "MultiheadAttention"}


def _switches_on_training(m: nn.Module) -> bool:
    """A module with no weight matrix anywhere inside (stochastic depth, drop-path, timm's
    BatchNormAct2d: a BatchNorm2d with an activation and a drop inside) whose own forward reads
    self.training. Tracing through it would bake training=True into the graph, so the
    transformed model would keep dropping paths, or normalise with batch statistics, in eval();
    as a leaf, train()/eval() still switch it, and it hides no op fracfx would quantize.
    """
    if any(p.dim() >= 2 for p in m.parameters()) or any(type(c).__name__ in _COMPUTE_NAMES or any(p.dim() >= 2 for p in c.parameters()) for c in m.modules()):
        return False
    return _forward_reads_training(type(m))


@functools.lru_cache(maxsize=None)
def _forward_reads_training(cls: type) -> bool:
    try:
        return "self.training" in inspect.getsource(cls.forward)
    except (OSError, TypeError):  # no source (builtin or generated class): trace through as usual
        return False


def _explain(error: Exception, failed: tuple[str, nn.Module] | None) -> str:
    where = _user_frame(error)
    if failed is None or not failed[0]:
        who = "the model's own forward()"
        fix = "pass concrete_args for arguments that drive Python control flow, or trace it yourself and pass the GraphModule"
    else:
        path, module = failed
        who = f"module '{path}' ({type(module).__name__})"
        fix = (
            f"mark it a leaf (QuantConfig(leaf_modules=({path!r},)) or --leaf {path}), pass concrete_args, "
            "or set trace_fallback=True to keep failing modules in FP32 automatically"
        )
    return f"torch.fx could not trace {who} at {where}: {type(error).__name__}: {error}\n  fix: {fix}"


def _user_frame(error: Exception) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        if not os.path.abspath(frame.filename).startswith(_TRACING_CODE):
            return f"{frame.filename}:{frame.lineno} ({(frame.line or '').strip()})"
    last = frames[-1] if frames else None
    return f"{last.filename}:{last.lineno}" if last else "an unknown line"
