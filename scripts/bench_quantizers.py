#!/usr/bin/env python
"""Micro-benchmark: each quantizer on CIFAR ResNet-38 shapes, fused kernels vs the eager torch code.

    python scripts/bench_quantizers.py [--threads 2] [--repeats 20]

Prints, per tensor shape and quantizer, the median time of the eager code and of the fused
kernels (interleaved) and ns per element. The eager rows are the same functions with the
kernels switched off (fracfx.nn.quant._fused = False), so the comparison is like for like.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from fracfx.cpu_memory import reuse_freed_memory
    from fracfx.nn import quant
    from fracfx.nn.gates import CandidateTable
    from fracfx.nn.mixed import MixedActQuant, MixedGradQuant
    from fracfx.nn.quantizers import ActQuant, GradQuant, WeightQuant

    reuse_freed_memory()
    if not quant.fused_kernels_enabled():
        print("fused kernels unavailable; nothing to compare")
        return 1
    table = CandidateTable(((3, 6), (4, 6), (4, 8), (6, 8), (6, 12)))

    def grad_of(module, g, *extra):
        y = torch.zeros_like(g, requires_grad=True)
        out = module(y, *extra)
        return lambda: torch.autograd.grad(out, y, g, retain_graph=True)

    print(f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'shape':>20} {'quantizer':>12} {'eager ms':>9} {'fused ms':>9} {'speed-up':>8} {'fused ns/elt':>12}")
    for shape in ((128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)):
        x = torch.randn(shape).relu_()
        g = torch.randn(shape) * 1e-3
        mask = torch.nn.functional.one_hot(torch.arange(shape[0]) % 5, 5).float()
        cases = {
            "act": lambda: ActQuant(8).train()(x),
            "grad": grad_of(GradQuant(8), g),
            "weight": lambda: WeightQuant(8)(torch.randn(shape[1], shape[1], 3, 3)),
            "mixed_act": lambda: MixedActQuant(table).train()(x, mask),
            "mixed_grad": grad_of(MixedGradQuant(table), g, mask),
        }
        for name, fn in cases.items():
            times = {True: [], False: []}
            for fused in (True, False):
                quant._fused = fused
                fn()
            for _ in range(args.repeats):
                for fused in (True, False):
                    quant._fused = fused
                    start = time.perf_counter()
                    fn()
                    times[fused].append(time.perf_counter() - start)
            quant._fused = True
            eager, fused = statistics.median(times[False]), statistics.median(times[True])
            numel = x.numel() if name != "weight" else shape[1] * shape[1] * 9
            print(f"{str(shape):>20} {name:>12} {eager * 1e3:9.3f} {fused * 1e3:9.3f} {eager / fused:7.1f}x {fused / numel * 1e9:12.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
