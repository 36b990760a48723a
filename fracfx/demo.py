"""`fracfx demo`: the main job end to end, on offline data, in a few minutes on 2 CPU cores.

    train (FracTrain by default: DFQ gates whose cost target PFQ's indicator raises) on
    Fashion-MNIST -> fixed precision (each gated block at its most used candidate) -> int8-fast ONNX
    (calibrated on training images) -> verify in onnxruntime on test images -> accuracy of PyTorch
    and ONNX on the whole test set -> summary + PNG.

Every number printed is measured in this run; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path


DEMO_WINDOW_FRACTION = 20  # indicator windows per run: short runs need short windows to turn
DEMO_EVALUATIONS = 4  # evaluations per run, so that the report's accuracy and precision panels have curves
VERIFY_IMAGES = 512  # test images the int8-fast file is verified on (against its reference and the frozen model)


@dataclasses.dataclass(frozen=True)
class DemoResult:
    run_dir: Path
    onnx_path: Path
    summary: dict


def run_demo(
    *,
    method: str = "fractrain",
    arch: str = "cifar_resnet38",
    iters: int = 200,
    batch_size: int = 128,
    out: str = "runs/demo",
    seed: int = 0,
    test_subset: int | None = None,
    progress: bool | None = None,
    console=None,
) -> DemoResult:
    from rich.console import Console

    from fracfx.export import export_onnx
    from fracfx.export.accuracy import CALIBRATION_IMAGES, run_accuracy, run_inputs
    from fracfx.export.fast_int8 import export_fast
    from fracfx.train.report import plot_runs
    from fracfx.train import TrainConfig, model_from_checkpoint, train

    console = console or Console()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(
        method=method, arch=arch, dataset="fashion-mnist", iters=iters, batch_size=batch_size, seed=seed,
        window=max(2, iters // DEMO_WINDOW_FRACTION), eval_every=max(1, iters // DEMO_EVALUATIONS), save_folder=str(out_dir / "train"),
        test_subset=test_subset,
    )
    console.rule(f"1/4 training: {method} {arch} on Fashion-MNIST, {iters} iterations")
    started = time.perf_counter()
    result = train(config, progress=progress, console=console)
    train_seconds = time.perf_counter() - started

    console.rule("2/4 fixed precision and ONNX export (int8-fast: onnxruntime's integer kernels), verified in onnxruntime")
    fixed, example = model_from_checkpoint(result.run_dir)
    int8_path = out_dir / "model.onnx"
    # calibrated on the run's own training images (fracfx export RUN does the same), verified on
    # test images: the comparison with the frozen model then measures the format on real inputs
    report = export_fast(fixed, int8_path, example, calibration_inputs=run_inputs(result.run_dir, CALIBRATION_IMAGES), verify=True,
                         verify_inputs=run_inputs(result.run_dir, VERIFY_IMAGES, split="test"), verify_label="test images", latency=True)
    for line in report.lines():
        console.print(f"  {line}")
    exact = export_onnx(fixed, out_dir / "model_exact.onnx", example, format="int8", latency=True)
    console.print(f"  {exact.lines()[0]}; latency (batch 1) exact int8 {exact.latency.qdq_ms:.2f} ms vs FP32 {exact.latency.fp32_ms:.2f} ms")
    sizes = {"int8-fast": report.file_bytes, "int8 exact": exact.file_bytes}
    if _weights_fit_int4(report):
        int4 = export_onnx(fixed, out_dir / "model_int4.onnx", example, format="int4", verify=True)
        sizes["int4"] = int4.file_bytes
        console.print(f"  {int4.lines()[0]}; export contract {'met' if int4.verify.ok else 'NOT MET'}")

    console.rule("3/4 accuracy on the Fashion-MNIST test set: trained, fixed precision, onnxruntime")
    accuracy = run_accuracy(result.run_dir, int8_path, test_subset=test_subset, batch_size=max(batch_size, 256))
    for line in accuracy.lines():
        console.print(f"  {line}")

    console.rule("4/4 report")
    png = plot_runs([result.run_dir], out_dir / "report.png")
    summary = {
        "method": method, "arch": arch, "iterations": iters, "train_seconds": round(train_seconds, 1),
        "test_samples": accuracy.samples,
        "accuracy_trained_pytorch": accuracy.trained,
        "accuracy_fixed_precision_pytorch": accuracy.fixed_precision,
        "accuracy_onnx": accuracy.onnx["enable_all"],
        "accuracy_onnx_disable_all": accuracy.onnx["disable_all"],
        "effective_macs_saving_vs_static8": result.summary["savings_vs_sbm"],
        "effective_macs_vs_fp32": result.summary["ratio_vs_fp32"],
        "onnx_bytes": sizes,
        "onnx_contract_met": bool(report.verify.ok),
        "latency_ms": {"int8_fast": report.latency.qdq_ms, "int8_exact": exact.latency.qdq_ms, "fp32": report.latency.fp32_ms},
        "report_png": str(png),
    }
    (out_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    console.print(_summary_table(summary))
    return DemoResult(result.run_dir, int8_path, summary)


def _weights_fit_int4(report) -> bool:
    return all(q.bits <= 4 for q in report.quantizers if q.role == "weight_quant")


def _summary_table(s: dict):
    from rich.table import Table

    table = Table(title="fracfx demo: measured in this run")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row(f"training ({s['method']}, {s['iterations']} it)", f"{s['train_seconds']:.0f} s")
    table.add_row("test accuracy, trained model (PyTorch)", f"{s['accuracy_trained_pytorch']:.2f} %")
    table.add_row("test accuracy, fixed precision (PyTorch)", f"{s['accuracy_fixed_precision_pytorch']:.2f} %")
    table.add_row("test accuracy, exported (onnxruntime ENABLE_ALL)", f"{s['accuracy_onnx']:.2f} %")
    table.add_row("test accuracy, exported (onnxruntime DISABLE_ALL)", f"{s['accuracy_onnx_disable_all']:.2f} %")
    table.add_row("effective MACs saved vs static 8-bit", f"{100 * s['effective_macs_saving_vs_static8']:.1f} %")
    table.add_row("effective MACs vs FP32 training", f"{100 * s['effective_macs_vs_fp32']:.2f} %")
    for fmt, size in s["onnx_bytes"].items():
        table.add_row(f"ONNX file ({fmt})", f"{size / 1e6:.2f} MB")
    lat = s["latency_ms"]
    table.add_row("ORT latency, int8-fast / exact int8 / FP32 (batch 1)", f"{lat['int8_fast']:.2f} / {lat['int8_exact']:.2f} / {lat['fp32']:.2f} ms")
    table.add_row("export contract (int8-fast: ORT vs its PyTorch int8 reference)", "met" if s["onnx_contract_met"] else "NOT MET")
    table.add_row("report", s["report_png"])
    return table
