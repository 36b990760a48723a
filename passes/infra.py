"""What every pass shares: copying a graph, rebuilding a GraphModule, running a pipeline."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.fx as fx

from fracfx.errors import FracfxError, PassError

GRAPH_MODULE_NAME = "FracfxGraphModule"


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
    copying); gm itself is not modified.
    """
    new_attrs = new_attrs or {}
    root: dict[str, object] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in root:
            target = node.target
            root[target] = new_attrs[target] if target in new_attrs else _fetch(gm, target)
    out = fx.GraphModule(root, graph, class_name=GRAPH_MODULE_NAME)
    out.meta.update(gm.meta)
    out.train(gm.training)
    return out


def _fetch(gm: fx.GraphModule, target: str):
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    return getattr(owner, name)


def run_pipeline(gm, steps: Sequence[tuple[str, Callable[[fx.GraphModule], fx.GraphModule]]]) -> fx.GraphModule:
    """Run named passes in order, linting after each; failures name the pass and its predecessor."""
    previous = "the input"
    for name, step in steps:
        try:
            gm = step(gm)
            gm.graph.lint()
        except FracfxError:
            raise
        except Exception as error:  # a bug or an unexpected graph: say where it happened
            raise PassError(f"pass '{name}' failed (after {previous}): {type(error).__name__}: {error}") from error
        previous = f"pass '{name}'"
    return gm


def module_path_of(node: fx.Node) -> str:
    """Qualified name of the module whose forward produced `node` ("" at the root)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else str(path)


def is_tensor(value) -> bool:
    return isinstance(value, torch.Tensor)
