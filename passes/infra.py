"""What every pass shares: the pass contract, the runner, copying a graph and rebuilding a module.

A pass is a function `verb_object(gm, /, **options) -> GraphModule` that returns a new module and
never mutates its input (submodules it does not replace are shared, their train/eval flags
untouched). It declares the node.meta keys (fracfx.meta.NODE_KEYS, GRAPH_KEYS) it reads and
writes with @graph_pass; run_pipeline checks, for each step:

    before: every key it reads is on the graph already or written by a pass run before it;
    after:  the graph lints, and every governed key holds only values that were on the input or
            that the pass declared writing (a pass may carry meta over, not invent it);

and turns any failure into an error naming the pass and the passes run before it. A FracfxError
keeps its class (a ConfigError stays a ConfigError) with that context prepended; anything else
becomes a PassError. Both carry `.pass_name` and `.after`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch.fx as fx
from torch import nn
from torch.fx._lazy_graph_module import _LazyGraphModule

from fracfx.errors import FracfxError, PassError
from fracfx.meta import GATE_CHOICE, GRAPH_KEYS, MODULE_STACK, NODE_KEYS, BlockSpec, QuantBinding, get_binding, get_block, get_inserted
from fracfx.nn.frozen import FROZEN_TYPES

GRAPH_MODULE_NAME = "FracfxGraphModule"


@dataclasses.dataclass(frozen=True)
class PassContract:
    """What a pass reads and writes: keys of node.meta or GraphModule.meta (fracfx.meta)."""

    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]


def graph_pass(*, reads: Sequence[str] = (), writes: Sequence[str] = ()):
    """Declare a function a pass: it gets `.contract`, which run_pipeline checks."""
    for key in (*reads, *writes):
        if key not in NODE_KEYS + GRAPH_KEYS:
            raise ValueError(f"{key!r} is not a meta key of fracfx.meta (NODE_KEYS, GRAPH_KEYS)")

    def declare(fn):
        fn.contract = PassContract(fn.__name__, tuple(reads), tuple(writes))
        return fn

    return declare


@dataclasses.dataclass(frozen=True)
class Step:
    """One line of a pipeline: a declared pass, its options, and whether it runs."""

    run: Callable[..., fx.GraphModule]
    options: Mapping[str, Any]
    enabled: bool = True

    @property
    def name(self) -> str:
        return self.run.contract.name


def step(run: Callable[..., fx.GraphModule], /, *, when: bool = True, **options) -> Step:
    """A pipeline step: `run(gm, **options)`, skipped when `when` is False."""
    if not hasattr(run, "contract"):
        raise TypeError(f"{getattr(run, '__name__', run)!r} is not declared with @graph_pass")
    return Step(run, options, bool(when))


def _meta_values(gm) -> dict[str, set[int]]:
    """Governed key -> ids of the values stored under it (node meta and gm.meta)."""
    found: dict[str, set[int]] = {}
    if not isinstance(gm, fx.GraphModule):
        return found
    for node in gm.graph.nodes:
        for key in NODE_KEYS:
            if key in node.meta:
                found.setdefault(key, set()).add(id(node.meta[key]))
    for key in GRAPH_KEYS:
        if key in gm.meta:
            found.setdefault(key, set()).add(id(gm.meta[key]))
    return found


def _check_reads(contract: PassContract, present: set[str], written: set[str]) -> None:
    missing = [key for key in contract.reads if key not in present and key not in written]
    if missing:
        raise PassError(f"reads meta {missing} that no earlier pass wrote and the input graph does not carry")


def _check_writes(contract: PassContract, before: dict[str, set[int]], after: dict[str, set[int]]) -> None:
    invented = [key for key, ids in after.items() if key not in contract.writes and not ids <= before.get(key, set())]
    if invented:
        raise PassError(f"wrote meta {invented} that it does not declare (it declares {list(contract.writes)})")


def _with_context(error: Exception, name: str, done: list[str]) -> Exception:
    after = ", ".join(done) if done else "nothing (the first pass)"
    message = f"pass '{name}' failed (after {after}): "
    if isinstance(error, FracfxError):
        try:
            wrapped = type(error)(message + str(error))
        except TypeError:  # an error class with another constructor: keep the base class
            wrapped = PassError(message + f"{type(error).__name__}: {error}")
    else:  # a bug or an unexpected graph
        wrapped = PassError(message + f"{type(error).__name__}: {error}")
    wrapped.pass_name, wrapped.after = name, tuple(done)
    return wrapped


def run_pipeline(gm, steps: Sequence[Step]) -> fx.GraphModule:
    """Run the enabled steps in order, checking each pass's contract (module docstring)."""
    done: list[str] = []
    written: set[str] = set()
    before = _meta_values(gm)
    for item in steps:
        if not item.enabled:
            continue
        contract = item.run.contract
        try:
            if isinstance(gm, fx.GraphModule):
                _check_reads(contract, set(before), written)
            out = item.run(gm, **item.options)
            out.graph.lint()
            after = _meta_values(out)
            _check_writes(contract, before, after)
        except Exception as error:
            if getattr(error, "pass_name", None) is not None:  # a nested pipeline already said where
                raise
            raise _with_context(error, contract.name, done) from error
        gm, before = out, after
        written.update(contract.writes)
        done.append(contract.name)
    if isinstance(gm, _LazyGraphModule):
        gm.real_recompile()  # the result is ready to run: its code is generated here, once
    return gm


# -- helpers the passes share --------------------------------------------------------------


def copy_graph(gm: fx.GraphModule) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A fresh copy of gm.graph (node meta copied shallowly) and the old->new node map."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    graph._codegen = gm.graph._codegen  # keeps pytree in/out specs (concrete_args, dict outputs)
    return graph, env


def rebuild(gm: fx.GraphModule, graph: fx.Graph, new_attrs: dict[str, object] | None = None) -> fx.GraphModule:
    """A new GraphModule for `graph`, taking referenced attributes from gm or `new_attrs`.

    Unchanged submodules and parameters are shared with gm (passes are functional, not
    copying); gm itself is not modified, its submodules keep their own train/eval flags. The new
    module and the modules created for it (new_attrs, containers) take gm's flag.
    """
    new_attrs = new_attrs or {}
    root: dict[str, object] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in root:
            target = node.target
            root[target] = new_attrs[target] if target in new_attrs else attr(gm, target)
    out = graph_module(root, graph)
    out.meta.update(gm.meta)
    shared = {id(m) for m in gm.modules()}
    for module in out.modules():
        if id(module) not in shared:
            module.training = gm.training
    return out


def graph_module(root, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule whose Python code is generated on first use: intermediate modules of a
    pipeline never run, so theirs never is (run_pipeline generates the last one's)."""
    return _LazyGraphModule(root, graph, class_name=GRAPH_MODULE_NAME)


def attr(gm: nn.Module, target: str):
    """The attribute (submodule, parameter, buffer) a call_module/get_attr target names."""
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    return getattr(owner, name)


def remove_dead_nodes(graph: fx.Graph, ops: Sequence[str] | None = None) -> None:
    """Erase unused nodes (of the given ops; default every op but placeholders and the output).

    Every node a fracfx graph holds is side-effect free (fx's own DCE needs an owning module).
    """
    for node in reversed(list(graph.nodes)):
        if node.op in ("placeholder", "output") or node.users or (ops is not None and node.op not in ops):
            continue
        graph.erase_node(node)


def gated_ops(graph: fx.Graph) -> Iterator[tuple[fx.Node, BlockSpec, QuantBinding]]:
    """(compute node, its block, its quantizers) for every quantized op inside a gated block."""
    for node in list(graph.nodes):
        spec, binding = get_block(node), get_binding(node)
        if spec is not None and binding is not None:
            yield node, spec, binding


def gate_choices(gm: fx.GraphModule) -> dict[int, nn.Module]:
    """Block index -> its GateChoice module, for every gate in gm."""
    found = {}
    for node in gm.graph.nodes:
        inserted = get_inserted(node)
        if inserted is not None and inserted.role == GATE_CHOICE:
            found[get_block(node).index] = gm.get_submodule(node.target)
    return found


def frozen_quantizers(gm: fx.GraphModule) -> dict[str, nn.Module]:
    """Submodule path -> frozen quantizer, for every one the graph calls."""
    found = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = attr(gm, node.target)
            if isinstance(module, FROZEN_TYPES):
                found[node.target] = module
    return found


def module_path_of(node: fx.Node) -> str:
    """Qualified name of the module whose forward produced `node` ("" at the root)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get(MODULE_STACK)
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else str(path)


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Every submodule in eval mode inside the block; each gets its own flag back afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
