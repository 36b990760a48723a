"""`fracfx inspect MODEL`: the quantized graph as a table of compute ops, bits, MACs and cost.

MODEL is a zoo name, a torchvision classification model or `package.module:factory`; resolving
it is one function (resolve_model) so checkpoints or .onnx files can be added there later.
The report is plain data (inspect_report) rendered separately as rich tables or as JSON.

A training run (its folder, or its checkpoint.pt) shows the trained model as `fracfx export`
would write it (fracfx.train.model_from_checkpoint: DFQ/FracTrain blocks pinned at their most
used candidate), the run's cost so far, and for DFQ/FracTrain the candidate usage per block
(training samples over the run; the last evaluation's test samples) from the checkpoint.
An exported .onnx file is described by fracfx.cli.inspect_onnx (QDQ quantizers, or int8-fast kernels).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

import torch
from torch import nn

from fracfx.cli.flags import add_flag
from fracfx.config import FIRST_LAYER, LAST_LAYER
from fracfx.errors import ConfigError

KEEP_NOTHING = "none"  # `--keep-fp32 none`: quantize every supported op


def register(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="show the quantized graph: ops, bits, MACs, cost vs FP32 and static 8-bit")
    parser.add_argument("model", metavar="MODEL", help="zoo name (cifar_resnet38), torchvision name (resnet18), package.module:factory, "
                        "a `fracfx train` run folder / checkpoint.pt, or an exported .onnx file")
    add_flag(parser, "--act-bits", type=int, default=8, help="activation bits, 0 = FP32 (default 8)")
    add_flag(parser, "--weight-bits", type=int, default=8, help="weight bits, 0 = FP32 (default 8)")
    add_flag(parser, "--grad-bits", type=int, default=8, help="gradient bits, 0 = FP32 (default 8)")
    add_flag(
        parser, "--keep-fp32", action="append", metavar="GLOB",
        help=f"module-path glob, {FIRST_LAYER} or {LAST_LAYER} to keep in FP32; repeatable; "
        f"'{KEEP_NOTHING}' quantizes everything (default: {LAST_LAYER})",
    )
    add_flag(parser, "--leaf", action="append", default=[], metavar="MODULE", help="module path or class name to keep opaque (not traced); repeatable")
    add_flag(parser, "--trace-fallback", action="store_true", help="keep modules that fail to trace as FP32 leaves instead of stopping")
    add_flag(parser, "--num-classes", type=int, default=10, help="classifier outputs (default 10)")
    add_flag(parser, "--in-channels", type=int, default=3, help="input channels (default 3; 1 for Fashion-MNIST)")
    add_flag(parser, "--input-size", type=_parse_size, default=None, metavar="H[xW]", help="input height and width (default: the model's own, e.g. 32 for the CIFAR zoo)")
    add_flag(parser, "--json", action="store_true", help="print the report as JSON instead of tables")
    parser.set_defaults(func=run)


def _parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip().lower())
    if not match or int(match.group(1)) < 1 or int(match.group(2) or 1) < 1:
        raise argparse.ArgumentTypeError(f"expected H or HxW with positive ints, such as 32 or 224x224, got {text!r}")
    height = int(match.group(1))
    return height, int(match.group(2) or height)


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    model: nn.Module
    input_size: tuple[int, int]


def resolve_model(spec: str, *, num_classes: int, in_channels: int, input_size: tuple[int, int] | None) -> ResolvedModel:
    """MODEL argument -> a float model and its input size. The one place new sources plug in."""
    from fracfx.models import build_model, default_input_size

    torch.manual_seed(0)  # weights do not change MACs, but a fixed seed keeps reruns identical
    model = build_model(spec, num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    return ResolvedModel(model, input_size or default_input_size(spec))


def keep_fp32_from_args(values: list[str] | None) -> tuple[str, ...] | None:
    """None means "the QuantConfig default"; ['none'] means keep nothing in FP32."""
    if values is None:
        return None
    if KEEP_NOTHING in values:
        if len(values) > 1:
            raise ConfigError(f"--keep-fp32 {KEEP_NOTHING} cannot be combined with other patterns {values}; give either 'none' or the patterns")
        return ()
    return tuple(values)


def build_config(args):
    from fracfx.config import QuantConfig

    options = dict(
        act_bits=args.act_bits, weight_bits=args.weight_bits, grad_bits=args.grad_bits,
        leaf_modules=tuple(args.leaf), trace_fallback=args.trace_fallback,
    )
    keep = keep_fp32_from_args(args.keep_fp32)
    if keep is not None:
        options["keep_fp32"] = keep
    return QuantConfig(**options)


def inspect_report(gm, *, model_name: str, input_shape: tuple[int, ...], config) -> dict:
    """Plain-data report of a transformed GraphModule: one row per compute op, totals, FP32 list."""
    import fracfx
    from fracfx.meta import get_op_cost, get_quant_spec

    cost = fracfx.cost_report(gm)
    nodes = {node.name: node for node in gm.graph.nodes}
    total = cost.effective_macs
    rows = []
    for row in cost.rows:
        node = nodes[row.name]
        rows.append({
            "node": row.name,
            "module_path": row.module_path,
            "op": get_quant_spec(node).module_type,
            "kind": row.kind,
            "output_shape": list(get_op_cost(node).output_shape),
            "macs": row.macs,
            "act_bits": row.act_bits,  # as the cost model counts them: 32 = FP32
            "weight_bits": row.weight_bits,
            "grad_bits": row.grad_bits,
            "quantized": get_quant_spec(node).quantize,
            "effective_macs": row.effective_macs,
            "share": row.effective_macs / total if total else 0.0,
        })
    totals = {key: value for key, value in cost.to_dict().items() if key != "rows"}
    fp32 = [dataclasses.asdict(op) for op in fracfx.fp32_report(gm)]
    return {"model": model_name, "input_shape": list(input_shape), "config": config.to_dict(), "ops": rows, "totals": totals, "fp32": fp32}


def _bits(row: dict) -> str:
    return f"{row['act_bits']}/{row['weight_bits']}/{row['grad_bits']}" if row["quantized"] else "fp32"


def _short(count: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(count) >= scale:
            return f"{count / scale:.2f}{suffix}"
    return f"{count:g}"


def render_tables(report: dict) -> list:
    """The report as rich renderables: the op table, the totals, and what stays FP32."""
    from rich.table import Table

    batch_free = "x".join(map(str, report["input_shape"][1:]))
    ops = Table(title=f"{report['model']}: compute ops for one {batch_free} sample", title_justify="left")
    for name, justify in (("node", "left"), ("module", "left"), ("op", "left"), ("output", "left"),
                          ("MACs", "right"), ("a/w/g bits", "right"), ("cost share", "right")):
        ops.add_column(name, justify=justify, overflow="fold")
    for row in report["ops"]:
        ops.add_row(
            row["node"], row["module_path"] or "(root)", row["op"], "x".join(map(str, row["output_shape"][1:])),
            _short(row["macs"]), _bits(row), f"{100 * row['share']:.2f} %",
        )
    totals = report["totals"]
    ops.add_section()
    ops.add_row(f"total ({len(report['ops'])} ops)", "", "", "", _short(totals["macs"]), "", "100.00 %" if report["ops"] else "")

    summary = Table(title="training cost per sample (forward + error backprop + weight gradient)", title_justify="left", show_header=False)
    summary.add_column("quantity")
    summary.add_column("value", justify="right")
    summary.add_row("MACs", f"{totals['macs']:,}")
    summary.add_row("effective MACs (bit-weighted, x3 passes)", f"{totals['effective_macs']:,.1f}")
    summary.add_row("vs FP32 training", f"{100 * totals['ratio_vs_fp32']:.3f} %")
    summary.add_row("vs static 8-bit training", f"{100 * totals['ratio_vs_sbm']:.3f} %")

    if not report["fp32"]:
        return [ops, summary, "Nothing stays FP32: every compute op is quantized."]
    fp32 = Table(title="stays FP32", title_justify="left")
    for name in ("node", "module", "op", "why"):
        fp32.add_column(name, overflow="fold")
    for op in report["fp32"]:
        fp32.add_row(op["node"], op["module_path"] or "(root)", op["op"], op["reason"])
    return [ops, summary, fp32]


def is_checkpoint(spec: str) -> bool:
    from pathlib import Path

    from fracfx.train import CHECKPOINT

    path = Path(spec)
    return (path.is_dir() and (path / CHECKPOINT).is_file()) or (path.is_file() and path.suffix == ".pt")


def checkpoint_report(spec: str) -> dict:
    """inspect_report of a training checkpoint's model, plus the run's state (cost, DFQ usage)."""
    from fracfx.runtime.dfq_usage import DFQUsage
    from fracfx.train import fixed_precision_model, load_trained, task_for

    loaded = load_trained(spec)
    usage = loaded.recipe.schedulers.get("tracking")
    dfq = usage if isinstance(usage, DFQUsage) else None
    gm = fixed_precision_model(loaded)
    config = loaded.config
    pinned = ", gated blocks at their pinned candidate" if dfq is not None else ""
    report = inspect_report(gm, model_name=f"{loaded.path} ({config.method} {config.arch}{pinned})", input_shape=tuple(loaded.example_input.shape), config=config)
    state = loaded.state
    last = state["metrics"][-1] if state["metrics"] else None
    run = {"path": str(loaded.path), "method": config.method, "iteration": state["iteration"], "finished": state["finished"],
           "iterations": loaded.plan.iterations, "last_metrics": _plain_metrics(last) if last else None,
           "score": list(task_for(config).score_row(last)) if last else None}
    if dfq is not None:
        run["dfq"] = {
            "candidates": list(dfq.labels), "target_ratio": dfq.controller.target_ratio, "pinned": dfq.pinned_candidates(),
            "train_usage": {name: list(counts) for name, counts in dfq.controller.usage_counts.items()},
            "eval_usage": dfq.last_eval_usage, "stage_cp": dfq.stage_cp(),
        }
    report["run"] = run
    return report


def _plain_metrics(record: dict) -> dict:
    keep = ("iteration", "test_acc", "train_loss", "effective_macs", "cost_vs_fp32", "cost_vs_sbm", "turning_points", "stage")
    return {**{k: record.get(k) for k in keep}, **{k: record[k] for k in ("test_ppl",) if k in record}}  # test_ppl: language models


def render_run(report: dict) -> list:
    """The run part of a checkpoint report as rich renderables (DFQ: usage per block)."""
    from rich.table import Table

    run = report["run"]
    out = []
    table = Table(title=f"training run: {run['method']}, iteration {run['iteration']} of {run['iterations']}"
                  + ("" if run["finished"] else " (unfinished)"), title_justify="left", show_header=False)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    last = run["last_metrics"]
    if last:
        table.add_row(*run["score"])  # the task's own score: test accuracy, or a language model's perplexity
        table.add_row("effective MACs so far", f"{last['effective_macs']:.4g}")
        table.add_row("vs FP32 / static 8-bit training", f"{100 * last['cost_vs_fp32']:.2f} % / {100 * last['cost_vs_sbm']:.2f} %")
    dfq = run.get("dfq")
    if dfq:
        table.add_row("cp set-point now", f"{dfq['target_ratio']:g}")
        for stage, s in sorted(dfq["stage_cp"].items(), key=lambda kv: int(kv[0])):
            table.add_row(f"stage {stage}: mean cp vs set-point", f"{s['cp']:.3f} vs {s['target']:g} ({s['iterations']} it.)")
    out.append(table)
    if dfq:
        usage = Table(title="DFQ candidate usage per block (% of samples): training over the run | last evaluation (test); "
                      "pinned = exported precision", title_justify="left")
        usage.add_column("block")
        for label in dfq["candidates"]:
            usage.add_column(label, justify="right")
        usage.add_column("pinned")
        for block, counts in dfq["train_usage"].items():
            test = (dfq["eval_usage"] or {}).get(block)
            total, test_total = max(sum(counts), 1), max(sum(test), 1) if test else 1
            cells = [f"{100 * c / total:.1f}" + (f" | {100 * t / test_total:.1f}" if test else "") for c, t in zip(counts, test or [0] * len(counts))]
            usage.add_row(block, *cells, dfq["pinned"][block])
        out.append(usage)
    return out


def run_checkpoint(args) -> int:
    report = checkpoint_report(args.model)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    from rich.console import Console

    console = Console()
    if not console.is_terminal and console.width <= 80:
        console = Console(width=160)
    for renderable in render_tables(report) + render_run(report):
        console.print(renderable)
    return 0


def run(args) -> int:
    import fracfx

    if args.model.endswith(".onnx"):
        from fracfx.cli.inspect_onnx import run_onnx

        return run_onnx(args)
    if is_checkpoint(args.model):
        return run_checkpoint(args)
    config = build_config(args)
    resolved = resolve_model(args.model, num_classes=args.num_classes, in_channels=args.in_channels, input_size=args.input_size)
    example = torch.randn(1, args.in_channels, *resolved.input_size)
    gm = fracfx.transform(resolved.model, config, example_inputs=example)
    report = inspect_report(gm, model_name=args.model, input_shape=tuple(example.shape), config=config)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from rich.console import Console

    console = Console()
    if not console.is_terminal and console.width <= 80:
        console = Console(width=160)  # piped or captured: do not fold module paths at 80 columns
    for renderable in render_tables(report):
        console.print(renderable)
    return 0
