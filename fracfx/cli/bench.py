"""`fracfx bench step|transform|ddp`: speed ratios against a baseline measured in the same run."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

RUNS = ("fp32", "static", "dfq", "fp32-compiled", "static-compiled")  # fracfx.bench.step.RUNS, without importing it here


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
    step.add_argument("--runs", default=",".join(RUNS),
                      help=f"comma-separated runs, always with fp32 (default all: {','.join(RUNS)}); static: fixed --bits; "
                           "dfq: gated per-sample precision (DFQConfig defaults, w=4) with its cost term; *-compiled: torch.compile(model)")
    step.add_argument("--method", choices=("static", "dfq"), default=None, help="shorthand for --runs fp32,METHOD")
    step.add_argument("--profile-steps", type=int, default=3, help="steps profiled for the quantizers' share of the step (0: skip)")
    step.add_argument("--repeats", type=int, default=7)
    step.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    step.add_argument("--compile-quant", choices=("fuse", "formula", "ops"), default=None,  # fracfx.nn.quant.COMPILE_MODES
                      help="what torch.compile traces for the quantizers of the *-compiled runs (fracfx.nn.quant.compile_mode, "
                           "docs/kernels.md): fuse (default) tensor formulas + one fused op for stochastic rounding; formula: all "
                           "tensor formulas, noise materialised; ops: the opaque fused C++ ops, as in eager mode")
    step.set_defaults(func=run_step)
    trans = sub.add_parser("transform", help="median wall time of fracfx.transform on a model")
    trans.add_argument("--arch", default="resnet50")
    trans.add_argument("--repeats", type=int, default=5)
    trans.set_defaults(func=run_transform)
    ddp = sub.add_parser("ddp", help="images/s of `fracfx train` in 1 process vs N data-parallel processes (torchrun, gloo on 127.0.0.1)")
    ddp.add_argument("--arch", default="cifar_resnet20")
    ddp.add_argument("--method", default="static", help="training method (default static 8/8/8)")
    ddp.add_argument("--batch-size", type=int, default=64, help="global batch, split over the processes (default 64)")
    ddp.add_argument("--processes", type=int, default=2, help="the data-parallel run's process count (default 2)")
    ddp.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ddp.add_argument("--iters", type=int, default=15, help="timed training steps per run (default 15)")
    ddp.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ddp.add_argument("--repeats", type=int, default=2, help="runs of each, alternating 1, N, 1, N, ...; medians reported (default 2)")
    ddp.add_argument("--sync-bn", action="store_true", help="time the data-parallel run with --sync-bn --sync-ranges")
    ddp.add_argument("--timeout", type=float, default=600.0, help="seconds before a launch is given up (default 600)")
    ddp.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run as a torchrun worker, JSON to this path
    ddp.set_defaults(func=run_ddp)
    from fracfx.bench.export import register as register_export

    register_export(sub)  # fracfx bench export: int8-fast / int8 / int4 / ORT quantize_static vs FP32 latency


def _parse_bits(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("--bits takes a,w,g such as 8,8,8")
    return tuple(parts)


def run_step(args) -> int:
    from fracfx.bench.step import run_step_benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    runs = ("fp32", args.method) if args.method else tuple(r.strip() for r in args.runs.split(",") if r.strip())
    runs = tuple(dict.fromkeys(("fp32",) + tuple(runs)))
    console = Console()
    report = run_step_benchmark(arch=args.arch, batch_size=args.batch_size, input_size=args.input_size, in_channels=args.in_channels,
                                bits=_parse_bits(args.bits), keep_fp32=tuple(args.keep_fp32), runs=runs, repeats=args.repeats,
                                profile_steps=args.profile_steps, log=lambda line: console.print(f"[dim]{line}[/dim]"),
                                compile_mode=args.compile_quant)
    kernels = "fused C++ quantizer kernels" if report.fused_kernels else "eager torch quantizers (fused kernels unavailable)"
    if report.compile_seconds:
        kernels += f", compiled quantizers: {report.compile_mode}"
    table = Table(title=f"training step, {report.arch}, batch {report.batch_size}, {report.device}, {report.threads} threads, "
                        f"{report.repeats} interleaved rounds, {kernels}")
    for col in ("run", "median s", "min s", "max s", "vs", "ratio of medians", "median paired ratio"):
        table.add_column(col, justify="right")
    for t in report.timings:
        base = report.baselines[t.name]
        same = base == t.name
        table.add_row(t.name, f"{t.median:.3f}", f"{min(t.seconds):.3f}", f"{max(t.seconds):.3f}", "" if same else base,
                      "1.000" if same else f"{report.ratio(t.name):.3f}x", "" if same else f"{report.paired_ratio(t.name):.3f}x")
    console.print(table)
    for name, seconds in report.compile_seconds.items():
        console.print(f"compile time ({name}, first step, not in the rounds): {seconds:.1f} s")
    if report.quantizer_share is not None:
        console.print(f"quantizers' share of the {'/'.join(map(str, report.bits))} step (profiler): {100 * report.quantizer_share:.1f} %")
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


def _ddp_config(args):
    from fracfx.train import TrainConfig

    steps = args.warmup + args.iters
    return TrainConfig(method=args.method, arch=args.arch, batch_size=args.batch_size, iters=steps, train_subset=args.batch_size * steps,
                       test_subset=args.batch_size, sync_bn=args.sync_bn, sync_ranges=args.sync_bn)


def _ddp_launch(args, processes: int, output: str) -> dict:
    import json
    import os
    import subprocess
    import sys

    from fracfx.bench.timing import free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "fracfx", "bench", "ddp", "--worker", output]
    for flag in ("arch", "method", "batch_size", "threads", "iters", "warmup"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    command += ["--sync-bn"] if args.sync_bn else []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        from fracfx.errors import DistributedError

        raise DistributedError(f"the {processes}-process benchmark run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    with open(output, encoding="utf-8") as handle:
        return json.load(handle)


def run_ddp(args) -> int:
    import json
    import tempfile

    if args.worker is not None:  # inside torchrun: every rank times, rank 0 reports
        from fracfx.bench.timing import data_parallel_throughput

        torch.set_num_threads(args.threads)
        result = data_parallel_throughput(_ddp_config(args), warmup=args.warmup, iters=args.iters)
        if result["rank"] == 0:
            with open(args.worker, "w", encoding="utf-8") as handle:
                json.dump(result, handle)
        return 0
    _ddp_config(args)  # validates the flags before anything is launched
    runs: dict[int, list[dict]] = {1: [], args.processes: []}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for processes in runs:
                runs[processes].append(_ddp_launch(args, processes, f"{folder}/{processes}-{repeat}.json"))
    medians = {n: statistics.median(r["images_per_s"] for r in results) for n, results in runs.items()}
    sync = ", --sync_bn --sync_ranges" if args.sync_bn else ""
    table = Table(title=f"fracfx train --method {args.method} --arch {args.arch}, global batch {args.batch_size}, "
                        f"{args.threads} thread(s) per process, {args.iters} timed steps{sync}, gloo on 127.0.0.1 ({args.repeats} runs each)")
    for col in ("processes", "images/s (median)", "runs", "vs 1 process"):
        table.add_column(col, justify="right")
    for n, results in runs.items():
        table.add_row(str(n), f"{medians[n]:.1f}", ", ".join(f"{r['images_per_s']:.1f}" for r in results), f"{medians[n] / medians[1]:.2f}x")
    console = Console()
    console.print(table)
    console.print(f"1 process: {medians[1]:.1f} images/s   {args.processes} processes: {medians[args.processes]:.1f} images/s   "
                  f"ratio {medians[args.processes] / medians[1]:.2f}x")
    return 0
