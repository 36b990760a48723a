"""`fracfx bench export`: onnxruntime latency of fracfx's ONNX formats against the FP32 export.

For each architecture (untrained weights with settled BatchNorm statistics, activation ranges
calibrated on seeded N(0, 1) batches: latency does not depend on the weights) it writes

    fp32            torch.onnx.export of the float model (the baseline)
    int8-fast       fracfx, a8/w8, format "int8-fast" (integer kernels, portable headroom)
    int8 exact      fracfx, a8/w8, format "int8" (exact QDQ: float convs on integer codes)
    int4 exact      fracfx, a8/w4, format "int4" (packed uint4 weights)
    ort static      onnxruntime.quantization.quantize_static of the same FP32 file (QDQ, u8
                    activations, s8 per-channel weights, reduce_range; quant_pre_process first)

and times them interleaved (A, B, C, ... repeated) in one process: 1 thread, ORT_ENABLE_ALL,
medians of `repeats` rounds, each round `inner` runs.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import tempfile
import time
import warnings

import torch

ARCHS = {"resnet18": 112, "cifar_resnet38": 32, "mobilenet_v2": 112}
VARIANTS = ("fp32", "int8-fast", "int8 exact", "int4 exact", "ort static")
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def machine() -> str:
    """CPU model and the flags that decide onnxruntime's int8 kernels."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:
        pass
    have = [f for f in FLAGS if f in flags]
    return f"{name}; {os.cpu_count()} CPUs; int8-relevant flags: {' '.join(have) or 'none'}"


def _calibration(shape, batches: int = 4, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn((16,) + shape, generator=generator) for _ in range(batches)]


def _settled(arch: str, shape) -> torch.nn.Module:
    from fracfx.models import build_model

    model = build_model(arch, num_classes=10)
    model.train()
    with torch.no_grad():
        for batch in _calibration(shape, 2, seed=7):
            model(batch)
    return model.eval()


def _quantized(model, shape, act_bits: int, weight_bits: int):
    import copy

    import fracfx
    from fracfx.export import calibrate

    config = fracfx.QuantConfig(act_bits=act_bits, weight_bits=weight_bits)
    gm = fracfx.transform(copy.deepcopy(model), config, example_inputs=torch.zeros((1,) + shape))
    return calibrate(gm, _calibration(shape))


def _ort_static(fp32_path: str, out_path: str, shape) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input_0": b.numpy()} for b in _calibration(shape)])

        def get_next(self):
            return next(self.batches, None)

    pre = out_path + ".pre.onnx"
    quant_pre_process(fp32_path, pre)
    quantize_static(pre, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def write_files(arch: str, size: int, folder: str) -> dict[str, str]:
    """The five files of one architecture (module docstring), variant -> path."""
    from fracfx.export import export_onnx
    from fracfx.export.fast_int8 import export_fast

    shape = (3, size, size)
    example = torch.zeros((1,) + shape)
    model = _settled(arch, shape)
    paths = {v: os.path.join(folder, f"{arch}.{v.replace(' ', '_')}.onnx") for v in VARIANTS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), paths["fp32"], dynamo=False, opset_version=17, input_names=["input_0"],
                          output_names=["output"], dynamic_axes={"input_0": {0: "batch"}, "output": {0: "batch"}})
    gm8 = _quantized(model, shape, 8, 8)
    export_fast(gm8, paths["int8-fast"], example, calibration_inputs=torch.cat(_calibration(shape)))
    export_onnx(gm8, paths["int8 exact"], example, format="int8")
    export_onnx(_quantized(model, shape, 8, 4), paths["int4 exact"], example, format="int4")
    _ort_static(paths["fp32"], paths["ort static"], shape)
    return paths


@dataclasses.dataclass(frozen=True)
class Row:
    arch: str
    size: int
    batch: int
    ms: dict  # variant -> median ms per run

    def ratio(self, variant: str) -> float:
        return self.ms[variant] / self.ms["fp32"]


def time_files(paths: dict[str, str], batch: int, size: int, *, repeats: int, inner: int) -> dict[str, float]:
    from fracfx.export.verify import session

    x = torch.randn((batch, 3, size, size), generator=torch.Generator().manual_seed(5)).numpy()
    runs = {}
    for variant, path in paths.items():
        sess = session(path, "enable_all", threads=1)
        feed = {sess.get_inputs()[0].name: x}
        runs[variant] = (lambda s=sess, f=feed: s.run(None, f))
        for _ in range(2):
            runs[variant]()
    samples = {v: [] for v in runs}
    for _ in range(repeats):
        for variant, run in runs.items():
            start = time.perf_counter()
            for _ in range(inner):
                run()
            samples[variant].append((time.perf_counter() - start) * 1e3 / inner)
    return {v: statistics.median(s) for v, s in samples.items()}


def bench(archs=tuple(ARCHS), batches=(1, 16), *, repeats: int = 7, sizes: dict | None = None, log=print) -> list[Row]:
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for arch in archs:
            size = (sizes or {}).get(arch, ARCHS.get(arch, 32))
            paths = write_files(arch, size, folder)
            for batch in batches:
                inner = max(1, 16 // batch)
                rows.append(Row(arch, size, batch, time_files(paths, batch, size, repeats=repeats, inner=inner)))
                log(format_row(rows[-1]))
    return rows


def header() -> str:
    cells = "".join(f"{v:>21}" for v in VARIANTS[1:])
    return f"{'arch':<16}{'input':>6}{'batch':>6}{'fp32 ms':>10}{cells}"


def format_row(row: Row) -> str:
    cells = "".join(f"{row.ms[v]:>11.2f} (x{row.ratio(v):.2f})" for v in VARIANTS[1:])
    return f"{row.arch:<16}{row.size:>6}{row.batch:>6}{row.ms['fp32']:>10.2f}{cells}"


def run(args) -> int:
    """The CLI entry (fracfx bench export)."""
    print(f"machine: {machine()}")
    print(f"onnxruntime 1 thread, ORT_ENABLE_ALL, interleaved, median of {args.repeats} rounds; cells: ms per run (x = / fp32)")
    print(header())
    rows = bench(tuple(args.arch), tuple(args.batch), repeats=args.repeats)
    target = max(max(r.ratio("int8-fast") for r in rows), 0.0)
    print(f"int8-fast / fp32: worst x{target:.2f} (target <= 0.75); "
          f"int8-fast / ort static: worst x{max(r.ms['int8-fast'] / r.ms['ort static'] for r in rows):.2f}")
    return 0 if target <= 0.75 else 1


def register(sub) -> None:
    """Add `export` to the `fracfx bench` subcommands."""
    p = sub.add_parser("export", help="onnxruntime latency of int8-fast / int8 / int4 / ORT quantize_static files vs the FP32 export")
    p.add_argument("--arch", nargs="+", default=list(ARCHS), help=f"architectures (default {' '.join(ARCHS)}; input sizes {ARCHS})")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16], help="batch sizes (default 1 16)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds; medians reported (default 7)")
    p.set_defaults(func=run)
