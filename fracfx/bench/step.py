"""`fracfx bench step`: FP32, static a/w/g and DFQ training steps, eager and under torch.compile,
timed side by side in one process (interleaved rounds, medians), plus the share of the quantized
step spent inside the quantizers (torch profiler).

Every run is one full SGD step (forward, loss, backward, update) on one fixed batch. Compiled runs
are `torch.compile(model)` with the default (inductor) backend; their first steps (the compile)
are timed separately and left out of the rounds.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch
from torch import nn

from fracfx.bench.timing import Timing, interleaved, training_step

RUNS = ("fp32", "static", "dfq", "fp32-compiled", "static-compiled")


@dataclasses.dataclass(frozen=True)
class StepReport:
    arch: str
    batch_size: int
    threads: int
    device: str
    repeats: int
    bits: tuple[int, int, int]
    timings: tuple[Timing, ...]
    baselines: dict[str, str]  # run -> the run its ratio is taken against
    compile_seconds: dict[str, float]
    quantizer_share: float | None  # fraction of the static step's time inside quantizers
    fused_kernels: bool
    compile_mode: str = "fuse"  # fracfx.nn.quant.compile_mode the compiled runs were traced with

    def timing(self, name: str) -> Timing:
        return next(t for t in self.timings if t.name == name)

    def ratio(self, name: str) -> float:
        return self.timing(name).median / self.timing(self.baselines[name]).median

    def paired_ratio(self, name: str) -> float:
        base = self.timing(self.baselines[name])
        return statistics.median(a / b for a, b in zip(self.timing(name).seconds, base.seconds))


def _quantizer_modules(model: nn.Module) -> list[nn.Module]:
    from fracfx.nn.mixed import MixedActQuant, MixedGradQuant
    from fracfx.nn.quantizers import QUANTIZER_TYPES

    return [m for m in model.modules() if isinstance(m, QUANTIZER_TYPES + (MixedActQuant, MixedGradQuant))]


_BACKWARD_NODES = ("GradQuantFnBackward", "FakeQuantSTEBackward", "MixedFakeQuantFnBackward")
_LABEL = "fracfx.quantizer"


def quantizer_share(model: nn.Module, step: Callable[[], None], steps: int = 3) -> float:
    """Fraction of the wall time of `steps` training steps spent in the quantizers.

    Each quantizer module's forward is wrapped in a profiler range for the measurement; the
    backward halves are the quantizers' autograd nodes. Both are timed on the calling thread,
    which runs every op (intra-op threads work inside the op), so the ranges add up to wall time.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    modules = _quantizer_modules(model)
    originals = []
    for module in modules:
        forward = module.forward

        def wrapped(*args, _forward=forward, **kwargs):
            with record_function(_LABEL):
                return _forward(*args, **kwargs)

        originals.append((module, "forward" in module.__dict__, forward))
        module.forward = wrapped
    try:
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            wall = time.perf_counter() - start
    finally:
        for module, had_own, forward in originals:
            if had_own:
                module.forward = forward
            else:
                del module.forward
    inside = sum(event.cpu_time_total for event in prof.key_averages() if event.key == _LABEL or event.key in _BACKWARD_NODES)
    return inside / 1e6 / wall


def run_step_benchmark(arch: str = "cifar_resnet38", batch_size: int = 128, input_size: int = 32, in_channels: int = 3,
                       bits: tuple[int, int, int] = (8, 8, 8), keep_fp32: tuple[str, ...] = ("@last",), runs: tuple[str, ...] = RUNS,
                       repeats: int = 7, profile_steps: int = 3, log: Callable[[str], None] = lambda _: None,
                       compile_mode: str | None = None) -> StepReport:
    """`compile_mode` (fracfx.nn.quant.COMPILE_MODES; None keeps the current one) is what torch.compile
    traces for the quantizers of the compiled runs, set for this call only."""
    from fracfx.nn import quant

    unknown = set(runs) - set(RUNS)
    if unknown:
        raise ValueError(f"unknown runs {sorted(unknown)}; choose from {', '.join(RUNS)}")
    with quant.compiled_as(compile_mode):
        return _measure(arch, batch_size, input_size, in_channels, bits, keep_fp32, runs, repeats, profile_steps, log)


def _measure(arch, batch_size, input_size, in_channels, bits, keep_fp32, runs, repeats, profile_steps, log) -> StepReport:
    import fracfx
    from fracfx.models import build_model
    from fracfx.nn import quant
    from fracfx.nn.quant import fused_kernels_enabled

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    float_model = build_model(arch, in_channels=in_channels).to(device)
    batch = torch.randn(batch_size, in_channels, input_size, input_size, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)
    a, w, g = bits
    static_name = f"{a}/{w}/{g}"
    models: dict[str, tuple[nn.Module, Callable | None]] = {}
    if {"fp32", "fp32-compiled"} & set(runs):
        models["fp32"] = (float_model, None)
    if {"static", "static-compiled"} & set(runs):
        config = fracfx.QuantConfig(act_bits=a, weight_bits=w, grad_bits=g, keep_fp32=tuple(keep_fp32))
        models["static"] = (fracfx.transform(float_model, config).to(device), None)
    if "dfq" in runs:
        from fracfx.runtime import DFQController

        dfq_model = fracfx.transform(float_model, fracfx.DFQConfig(), example_inputs=batch[:2]).to(device)
        models["dfq"] = (dfq_model, DFQController(dfq_model, target_ratio=3.0).cost_loss)
    names = {"fp32": "fp32", "static": static_name, "dfq": "dfq", "fp32-compiled": "fp32 compiled", "static-compiled": f"{static_name} compiled"}
    steps: dict[str, Callable[[], None]] = {}
    compile_seconds: dict[str, float] = {}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for run in runs:
        base = run.removesuffix("-compiled")
        model, extra = models[base]
        if run.endswith("-compiled"):
            log(f"compiling {names[base]} ...")
            model = torch.compile(model)
        step = training_step(model, batch, labels, extra_loss=extra)

        def timed(step=step):
            step()
            sync()

        if run.endswith("-compiled"):
            start = time.perf_counter()
            timed()  # forward and backward graphs compile here
            compile_seconds[names[run]] = time.perf_counter() - start
        steps[names[run]] = timed
    log(f"timing {', '.join(steps)}: {repeats} interleaved rounds ...")
    timings = interleaved(steps, repeats=repeats)
    baselines = {}
    for run in runs:
        baselines[names[run]] = names["fp32-compiled"] if run == "static-compiled" and "fp32-compiled" in runs else "fp32"
    share = None
    if "static" in runs and profile_steps > 0:
        log("profiling the quantized step ...")
        share = quantizer_share(models["static"][0], steps[static_name], profile_steps)
    return StepReport(arch, batch_size, torch.get_num_threads(), str(device), repeats, bits, tuple(timings), baselines, compile_seconds, share,
                      fused_kernels_enabled(), quant.compile_mode)
