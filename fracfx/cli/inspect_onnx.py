"""`fracfx inspect model.onnx`: what an exported file holds, for each kind of file fracfx writes.

    QDQ (formats int8, int4)   its quantizers: bits, code type, channels, scales, zero points
                               (fracfx.export.describe_onnx, from the file's fracfx.quantizers metadata)
    int8-fast (and -vnni, -faithful)
                               its integer kernels: input/weight/output bits, largest |weight|,
                               weight scales, bytes; op counts, initializer sizes by type and the
                               lowering statistics (fracfx.export.fast_describe, from the graph)

The file's `fracfx.format` metadata says which; --json prints the same data.
"""

from __future__ import annotations

import dataclasses
import json


def run_onnx(args) -> int:
    import onnx

    from fracfx.export.fast_describe import is_fast_file

    if is_fast_file(onnx.load(args.model, load_external_data=False)):
        return _run_fast(args)
    return _run_qdq(args)


def _run_qdq(args) -> int:
    from fracfx.export import describe_onnx

    rows = describe_onnx(args.model)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.model}: {len(rows)} quantizers (QDQ)")
    for column in ("quantizer", "role", "bits", "codes", "channels", "scale min", "scale max", "zero point", "arithmetic"):
        table.add_column(column, justify="left" if column in ("quantizer", "role", "codes") else "right")
    for r in rows:
        zero_point = str(r.zero_point_min) if r.zero_point_min == r.zero_point_max else f"{r.zero_point_min}..{r.zero_point_max}"
        table.add_row(r.name, r.role, str(r.bits), r.dtype, str(r.channels), f"{r.scale_min:.4g}", f"{r.scale_max:.4g}", zero_point,
                      "integer" if r.centered else "dequantized")
    Console(width=160).print(table)
    return 0


def _run_fast(args) -> int:
    from fracfx.export.fast_describe import describe_fast

    info = describe_fast(args.model)
    if args.json:
        print(json.dumps(dataclasses.asdict(info), indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    kernels = Table(title=f"{info.path}: format {info.format}, opset {info.opset}, {info.file_bytes / 1e6:.3f} MB; "
                    f"{len(info.kernels)} integer kernels", title_justify="left")
    for column in ("value", "op", "weight shape", "input", "weights", "max |w|", "w scale min", "w scale max", "output", "bytes"):
        kernels.add_column(column, justify="left" if column in ("value", "op", "weight shape", "output") else "right", overflow="fold")
    for r in info.kernels:
        scales = ("-", "-") if r.weight_scale_min is None else (f"{r.weight_scale_min:.4g}", f"{r.weight_scale_max:.4g}")
        kernels.add_row(r.name, r.op, r.shape, f"{r.input_bits}-bit codes", f"{r.weight_bits}-bit", str(r.weight_max), *scales,
                        r.output, f"{r.weight_bytes:,}")
    console.print(kernels)
    summary = Table(title="the whole file", title_justify="left", show_header=False)
    summary.add_column("quantity")
    summary.add_column("value", overflow="fold")
    summary.add_row("ops", ", ".join(f"{op} x{n}" for op, n in info.ops.items()))
    summary.add_row("initializers", ", ".join(f"{dtype} {size:,} B" for dtype, size in info.initializer_bytes.items()))
    if info.lowering:
        s = info.lowering
        summary.add_row("BatchNorms folded", str(s.get("folded_bn")))
        summary.add_row("new 8-bit requantization points", str(s.get("new_grids")))
        summary.add_row("weight channels re-quantized for int16 headroom", str(s.get("requantized_channels")))
        summary.add_row("float ops", str(s.get("float_ops")))
    console.print(summary)
    return 0
