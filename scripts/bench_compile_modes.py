#!/usr/bin/env python
"""Compiled 8/8/8 training step against the compiled FP32 step, one quantized model per compile mode.

    python scripts/bench_compile_modes.py [--threads 1] [--modes fuse,formula,ops] [--repeats 15]

fracfx.nn.quant.compile_mode decides what torch.compile traces for the quantizers (docs/kernels.md,
"torch.compile"). Here every mode's model is compiled in this one process and all steps are timed
in interleaved rounds (medians, and the median of the per-round ratios against compiled FP32), so
the modes are compared under the same load. The mode is a module global that dynamo guards on:
each model is compiled (its first two steps) while its mode is set, and the timed rounds run with
torch.compiler.set_stance(skip_guard_eval_unsafe=True) so that no model is recompiled.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--modes", default="fuse,formula,ops", help="comma-separated fracfx.nn.quant.COMPILE_MODES")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--arch", default="cifar_resnet38")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import fracfx
    from fracfx.bench.timing import interleaved, training_step
    from fracfx.cpu_memory import reuse_freed_memory
    from fracfx.models import build_model
    from fracfx.nn import quant

    reuse_freed_memory()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    torch.manual_seed(0)
    float_model = build_model(args.arch, in_channels=3)
    batch, labels = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))
    steps = {"fp32 compiled": training_step(torch.compile(float_model), batch, labels)}
    for mode in modes:
        with quant.compiled_as(mode):
            model = fracfx.transform(float_model, fracfx.QuantConfig(act_bits=8, weight_bits=8, grad_bits=8))
            steps[f"8/8/8 {mode}"] = training_step(torch.compile(model), batch, labels)
            start = time.perf_counter()
            steps[f"8/8/8 {mode}"]()
            print(f"compile {mode}: {time.perf_counter() - start:.1f} s", flush=True)
            steps[f"8/8/8 {mode}"]()
    start = time.perf_counter()
    steps["fp32 compiled"]()
    print(f"compile fp32: {time.perf_counter() - start:.1f} s", flush=True)
    with open("/proc/loadavg") as handle:
        print("load average before the rounds:", " ".join(handle.read().split()[:3]))
    with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
        timings = interleaved(steps, repeats=args.repeats)
    with open("/proc/loadavg") as handle:
        print("load average after the rounds: ", " ".join(handle.read().split()[:3]))
    base = timings[0]
    print(f"{args.arch}, batch {args.batch_size}, {torch.get_num_threads()} thread(s), {args.repeats} interleaved rounds")
    for t in timings:
        paired = statistics.median(a / b for a, b in zip(t.seconds, base.seconds))
        print(f"  {t.name:16s} median {t.median:.3f} s  min {min(t.seconds):.3f} s  vs fp32 compiled: "
              f"{t.median / base.median:.3f}x (paired {paired:.3f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
