"""`fracfx export MODEL_OR_CHECKPOINT -o model.onnx`: freeze at fixed bits and write a QDQ ONNX file.

MODEL_OR_CHECKPOINT is a model name (build_model: the fracfx zoo, torchvision, `pkg.mod:factory`)
or a checkpoint file. A model name gives a freshly initialised network whose activation ranges are
calibrated on seeded N(0, 1) batches: that checks the export path, not a trained model's accuracy.
A checkpoint is read through fracfx.train.model_from_checkpoint(path) -> (GraphModule,
example_input) when that exists (see load_source: the one place to plug loaders in).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from fracfx.cli.flags import add_flag
from fracfx.errors import ExportError


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="freeze a model at fixed bits and write a QDQ ONNX file (optionally verified in onnxruntime)")
    p.add_argument("source", metavar="MODEL_OR_CHECKPOINT", help="model name (e.g. cifar_resnet20, resnet18) or checkpoint file")
    add_flag(p, "-o", "--output", required=True, help="path of the .onnx file to write")
    add_flag(p, "--bits", default=None, help="A,W: activation and weight bits (overrides --act-bits/--weight-bits)")
    add_flag(p, "--act-bits", type=int, default=None, help="activation bits (default 8 for a model name, as trained for a checkpoint)")
    add_flag(p, "--weight-bits", type=int, default=None, help="weight bits (default 8 for a model name, as trained for a checkpoint)")
    add_flag(p, "--format", choices=("auto", "int8-fast", "int8-fast-vnni", "int8-fast-faithful", "int8", "int4"), default="auto",
             help="auto (default, for deploying): int8-fast where it can express every op, else int8 (transformers), saying why; "
                  "int8-fast: onnxruntime's integer kernels, BatchNorm folded, correct on any CPU; "
                  "int8-fast-vnni: full int8 weight range, for CPUs with VNNI or ARM dot product; int8-fast-faithful: no "
                  "rounding the trained model lacks (ConvInteger on residual branches), slower; int8: exact QDQ (float convs "
                  "on integer codes, matches the frozen model to 1e-4), opset 17; int4: exact, packed uint4 weights, opset 21")
    add_flag(p, "--opset", type=int, default=None, help="ONNX opset (default 17 for int8, 21 for int4)")
    add_flag(p, "--arithmetic", choices=("integer", "dequantized"), default="integer",
             help="integer: ops on integer codes, bit-exact in any runtime (default); dequantized: classic QDQ")
    add_flag(p, "--verify", action="store_true", help="check the file in onnxruntime (ORT_DISABLE_ALL and ORT_ENABLE_ALL) against the frozen model")
    add_flag(p, "--verify-samples", type=int, default=64, help="seeded N(0, 1) inputs used by --verify (default 64)")
    add_flag(p, "--latency", action="store_true", help="time the file against its FP32 twin in onnxruntime")
    add_flag(p, "--input-size", default=None, help="H or H,W for a model name (default: the model's own)")
    add_flag(p, "--in-channels", type=int, default=3, help="input channels for a model name (default 3)")
    add_flag(p, "--num-classes", type=int, default=10, help="classes for a model name (default 10)")
    add_flag(p, "--calib-batches", type=int, default=4, help="seeded random batches of 16 that set activation ranges for a model name")
    add_flag(p, "--test-accuracy", action="store_true",
             help="checkpoint only: top-1 on the run's test set of the trained model, the fixed-precision model and the file in onnxruntime")
    add_flag(p, "--test-subset", type=int, default=None, help="with --test-accuracy: the first N test images only")
    add_flag(p, "--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def parse_bits(args) -> tuple[int | None, int | None]:
    if args.bits is None:
        return args.act_bits, args.weight_bits
    parts = args.bits.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ExportError(f"--bits takes A,W (activation and weight bits, e.g. 4,4), got {args.bits!r}")
    return int(parts[0]), int(parts[1])


def _input_size(text: str | None, default: tuple[int, int]) -> tuple[int, int]:
    if text is None:
        return default
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ExportError(f"--input-size takes H or H,W (positive ints), got {text!r}")
    return (int(parts[0]), int(parts[-1]))


def load_source(args, act_bits, weight_bits):
    """(transformed GraphModule with ranges, example input) for a model name or a checkpoint."""
    import torch

    import fracfx
    from fracfx.api import set_bits

    if os.path.exists(args.source):
        try:
            from fracfx.train import model_from_checkpoint
        except ImportError as error:
            raise ExportError(
                f"{args.source} is a file, but this fracfx cannot rebuild a model from a checkpoint yet "
                "(fracfx.train.model_from_checkpoint is missing); export by model name, or from Python with fracfx.export_onnx"
            ) from error
        gm, example = model_from_checkpoint(args.source)
        set_bits(gm, act_bits=act_bits, weight_bits=weight_bits)
        return gm, example
    from fracfx.export import calibrate
    from fracfx.models import build_model, default_input_size

    size = _input_size(args.input_size, default_input_size(args.source))
    model = build_model(args.source, num_classes=args.num_classes, in_channels=args.in_channels, input_size=size)
    example = torch.zeros(1, args.in_channels, *size)
    config = fracfx.QuantConfig(act_bits=8 if act_bits is None else act_bits, weight_bits=8 if weight_bits is None else weight_bits)
    gm = fracfx.transform(model, config, example_inputs=example)
    generator = torch.Generator().manual_seed(0)
    calibrate(gm, [torch.randn(16, args.in_channels, *size, generator=generator) for _ in range(max(1, args.calib_batches))])
    return gm, example


def run_calibration(args):
    """A run's own training images for a fast-format export (fracfx.export.weight_rounding rounds the
    re-quantized weight channels against them), or None: an exact format, a model name, or a run
    whose dataset is not on this machine (said on stderr; the export is then data-free)."""
    from fracfx.errors import FracfxError
    from fracfx.export.fast_int8 import FAST_FORMATS

    if args.format not in ("auto", *FAST_FORMATS) or not os.path.exists(args.source):
        return None
    from fracfx.export.accuracy import CALIBRATION_IMAGES, run_inputs

    try:
        return run_inputs(args.source, CALIBRATION_IMAGES)
    except FracfxError as error:
        print(f"note: exporting without calibration on the run's training data ({error}); "
              "the new 8-bit grids take their ranges from BatchNorm, re-quantized weights are rounded to nearest", file=sys.stderr)
        return None


def run(args) -> int:

    from fracfx.export import export_onnx, random_inputs
    from fracfx.export.fast_report import NOISE

    act_bits, weight_bits = parse_bits(args)
    if args.test_accuracy and not os.path.exists(args.source):
        raise ExportError(f"--test-accuracy measures a trained run on its test set; {args.source!r} is a model name, pass a run folder or checkpoint.pt")
    gm, example = load_source(args, act_bits, weight_bits)
    verify_inputs = random_inputs(gm, example, max(1, args.verify_samples), seed=1) if args.verify else None
    report = export_onnx(
        gm, args.output, example, format=args.format, opset=args.opset, arithmetic=args.arithmetic, verify=args.verify,
        verify_inputs=verify_inputs, latency=args.latency, calibration_inputs=run_calibration(args), verify_label=NOISE,
    )
    accuracy = None
    if args.test_accuracy:
        from fracfx.export.accuracy import run_accuracy

        accuracy = run_accuracy(args.source, args.output, test_subset=args.test_subset)
    if args.json:
        payload = dataclasses.asdict(report)
        if accuracy is not None:
            payload["test_accuracy"] = dataclasses.asdict(accuracy)
        print(json.dumps(payload, indent=2, default=str))
    else:
        if not os.path.exists(args.source):
            print(f"{args.source}: freshly initialised, activation ranges from {args.calib_batches} random batches")
        print("\n".join(report.lines() + (accuracy.lines() if accuracy else [])))
    return 1 if report.verify is not None and not report.verify.ok else 0
