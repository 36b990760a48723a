"""`fracfx bench step|transform`: speed ratios against a baseline measured in the same run."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks: quantized training step vs FP32; transform time")
    sub = parser.add_subparsers(dest="bench", required=True)
    step = sub.add_parser("step", help="median time of a training step, quantized / FP32, interleaved in one process")
    step.add_argument("--arch", default="cifar_resnet38")
    step.add_argument("--batch-size", type=int, default=128)
    step.add_argument("--input-size", type=int, default=32)
    step.add_argument("--in-channels", type=int, default=3)
    step.add_argument("--bits", default="8,8,8", help="a,w,g bits of the quantized run (default 8,8,8)")
    step.add_argument("--keep-fp32", nargs="*", default=["@last"], help="globs / @first / @last kept FP32 (default @last)")
    step.add_argument("--method", choices=("static", "dfq"), default="static",
                      help="static: fixed --bits; dfq: gated per-sample precision (DFQConfig defaults, w=4) with its cost term")
    step.add_argument("--repeats", type=int, default=7)
    step.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    step.set_defaults(func=run_step)
    trans = sub.add_parser("transform", help="median wall time of fracfx.transform on a model")
    trans.add_argument("--arch", default="resnet50")
    trans.add_argument("--repeats", type=int, default=5)
    trans.set_defaults(func=run_transform)


def _parse_bits(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("--bits takes a,w,g such as 8,8,8")
    return tuple(parts)


def run_step(args) -> int:
    import fracfx
    from fracfx.bench import interleaved, training_step
    from fracfx.models import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    a, w, g = _parse_bits(args.bits)
    float_model = build_model(args.arch, in_channels=args.in_channels)
    batch = torch.randn(args.batch_size, args.in_channels, args.input_size, args.input_size)
    labels = torch.randint(0, 10, (args.batch_size,))
    if args.method == "dfq":
        from fracfx.runtime import DFQController

        quant_model = fracfx.transform(float_model, fracfx.DFQConfig(), example_inputs=batch[:2])
        controller = DFQController(quant_model, target_ratio=3.0)
        name, extra_loss = "dfq", controller.cost_loss
    else:
        config = fracfx.QuantConfig(act_bits=a, weight_bits=w, grad_bits=g, keep_fp32=tuple(args.keep_fp32))
        quant_model = fracfx.transform(float_model, config)
        name, extra_loss = f"{a}/{w}/{g}", None
    timings = interleaved(
        {"fp32": training_step(float_model, batch, labels), name: training_step(quant_model, batch, labels, extra_loss=extra_loss)},
        repeats=args.repeats,
    )
    base = timings[0]
    pair_ratios = [q / f for q, f in zip(timings[1].seconds, base.seconds)]
    table = Table(title=f"training step ({args.method}), {args.arch}, batch {args.batch_size}, {torch.get_num_threads()} threads, {args.repeats} interleaved rounds")
    for col in ("run", "median s", "min s", "max s", "median / fp32"):
        table.add_column(col, justify="right")
    for t in timings:
        table.add_row(t.name, f"{t.median:.3f}", f"{min(t.seconds):.3f}", f"{max(t.seconds):.3f}", f"{t.median / base.median:.3f}")
    console = Console()
    console.print(table)
    console.print(f"ratio of medians: {timings[1].median / base.median:.3f}x   median of paired ratios: {statistics.median(pair_ratios):.3f}x")
    return 0


def run_transform(args) -> int:
    import fracfx
    from fracfx.models import build_model

    model = build_model(args.arch)
    fracfx.transform(model)  # warm imports and caches
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fracfx.transform(model)
        times.append(time.perf_counter() - start)
    print(f"fracfx.transform({args.arch}): median {statistics.median(times):.3f} s over {args.repeats} runs (min {min(times):.3f}, max {max(times):.3f})")
    return 0
