"""Top-1 accuracy of a trained run on its own test set: as trained, at fixed precision, and as
the exported ONNX file runs in onnxruntime (the file must match the trained model).

    acc = run_accuracy("runs/static8", "static8.onnx")
    acc.trained, acc.fixed_precision, acc.onnx["disable_all"], acc.onnx["enable_all"]

`trained` is the checkpoint's model in eval mode (running activation ranges, DFQ gates choosing
per sample); `fixed_precision` is fracfx.freeze of the model that `fracfx export` writes (DFQ:
every block pinned at its most used candidate; the integer zero-point grid), i.e. what the ONNX
file is verified against.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from fracfx.export.verify import LEVELS


@dataclasses.dataclass(frozen=True)
class RunAccuracy:
    """Top-1 in percent of one run's test set, by model variant."""

    samples: int
    trained: float  # percent
    fixed_precision: float
    onnx: dict[str, float]  # optimisation level -> percent

    def lines(self) -> list[str]:
        onnx = ", ".join(f"{level} {acc:.2f} %" for level, acc in self.onnx.items())
        worst = max(abs(acc - self.trained) for acc in self.onnx.values())
        return [
            f"test-set top-1 on {self.samples:,} images: trained {self.trained:.2f} %, fixed precision {self.fixed_precision:.2f} %, "
            f"onnxruntime {onnx}; largest ONNX - trained gap {worst:.2f} points"
        ]


def run_accuracy(
    run: str | os.PathLike, onnx_path: str | os.PathLike, *, test_subset: int | None = None,
    batch_size: int = 256, levels=LEVELS, threads: int | None = None,
) -> RunAccuracy:
    """Accuracies of the run's trained model, its fixed-precision model and `onnx_path` on the test set."""
    from fracfx.errors import ExportError
    from fracfx.export import freeze
    from fracfx.train import evaluate, fixed_precision_model, load_trained, task_for
    from fracfx.export.verify import dataset_accuracy

    loaded = load_trained(run)
    config = loaded.config
    task = task_for(config)
    if task.metric != "acc":
        raise ExportError(f"{run} is a {config.dataset} language-model run: test-set top-1 is for image classifiers; export it without --test-accuracy")
    _, loader, _ = task.build_loaders(config.dataset, datadir=config.datadir, batch_size=batch_size, seed=config.seed, test_subset=test_subset)
    cpu = torch.device("cpu")
    _, trained = evaluate(loaded.model, loader, cpu)
    _, fixed_acc = evaluate(freeze(fixed_precision_model(loaded)), loader, cpu)
    threads = threads or torch.get_num_threads()
    onnx, samples = {}, 0
    for level in levels:
        onnx[level], samples = dataset_accuracy(onnx_path, loader, level=level, threads=threads)
    return RunAccuracy(samples, trained, fixed_acc, onnx)


CALIBRATION_IMAGES = 256  # a run's own training images that calibrate its fast-int8 export (weight_rounding: stable statistics)


def run_inputs(run: str | os.PathLike, count: int, *, split: str = "train") -> torch.Tensor:
    """`count` inputs of a run's own data, the same on every call: the first batch its training
    loader draws (seeded and augmented as in training: calibration data for a fast-int8 export),
    or the first `count` of its test set (`split="test"`)."""
    from fracfx.train import load_trained, task_for

    config = load_trained(run).config
    train_loader, test_loader, _ = task_for(config).build_loaders(
        config.dataset, datadir=config.datadir, batch_size=count, seed=config.seed, train_subset=config.train_subset,
        test_subset=count if split == "test" else None,
    )
    return next(iter(train_loader if split == "train" else test_loader))[0][:count]


def __getattr__(name: str):
    # the names before the package layout: kept for one release
    old = {"test_set_accuracy": run_accuracy, "TestSetAccuracy": RunAccuracy}
    if name in old:
        import warnings

        new = old[name].__name__
        warnings.warn(f"fracfx.export.accuracy.{name} is deprecated; use {new}", DeprecationWarning, stacklevel=2)
        return old[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
