"""The training loop behind `fracfx train`: FP32, static and PFQ recipes, resumable exactly.

    from fracfx.train import TrainConfig, train
    result = train(TrainConfig(method="pfq", arch="cifar_resnet20", epochs=1, save_folder="runs/pfq"))

A run directory holds config.json (the resolved config), metrics.jsonl (one line per
evaluation), checkpoint.pt (written atomically at every evaluation and at the end) and
summary.json. `train(config, resume="runs/pfq")` continues from the checkpoint and ends with the
same weights and metrics as a run that was never interrupted: the checkpoint holds the model
(with quantizer bits, ranges and rounding-generator state), optimizer, LR schedule, the method's
state (the PFQ indicator), every RNG, the cost meter, the metrics so far; the data order is a
function of (seed, iteration) (see fracfx.data).

Tasks
-----
What the data is, the model and example input it needs, and how predictions are scored:
ImageTask (fracfx.data, top-1 accuracy) or, for the text datasets, fracfx.train.text's
LanguageModelTask (token-level cross-entropy, perplexity; --context/--d_model/... size the model).
task_for(config) picks one; TrainConfig refuses a model that does not fit the data.

Methods
-------
A method is a Method subclass registered with @register_method. It decides how the float model
becomes the trained model and how precision evolves; the loop is shared. Built in: fp32, static,
pfq. Others (dfq, fractrain) live in modules listed in METHOD_MODULES, imported on first use;
a method may declare its own options (Method.options), which become CLI flags and are stored in
TrainConfig.options.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import io
import json
import math
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fracfx.bits import check_bits, cost_bits
from fracfx.errors import CheckpointError, ConfigError, DistributedError

# Modules that define more methods (imported on first lookup; a missing one is skipped).
METHOD_MODULES: tuple[str, ...] = ("fracfx.train.dfq",)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
SUMMARY = "summary.json"
TIMING_KEY = "timing"  # the only part of a metrics line that may differ between identical runs
RUN_KIND = "fracfx-train"
OPTIMIZERS = ("sgd", "adam")
RESUME_OVERRIDABLE = ("workers", "device")  # may change on resume: they do not change the numbers


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class Option:
    """A method-specific setting: becomes the CLI flag --<name> and TrainConfig.options[name]."""

    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    nargs: str | None = None


class MethodDefault:
    """A TrainConfig default the method may override (Method.field_defaults), else `value`."""

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return f"MethodDefault({self.value!r})"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that defines a training run. None means "derive it" (see plan_run())."""

    method: str = "pfq"
    arch: str = "cifar_resnet38"
    dataset: str = "fashion-mnist"
    datadir: str | None = None
    download: bool = False
    train_subset: int | None = None
    test_subset: int | None = None
    batch_size: int = 128
    test_batch_size: int | None = None
    iters: int | None = None
    epochs: float | None = None  # used when iters is None; both None -> 3 epochs
    lr: float = 0.1
    lr_milestones: tuple[int, ...] | None = None  # iterations; default 50 % and 75 % of the run
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    optimizer: str = "sgd"  # "sgd" (FRACTRAIN.md section 6) | "adam" (transformers; momentum is then unused)
    act_bits: int = 8  # static
    weight_bits: int = MethodDefault(8)  # 8; dfq/fractrain: 4 (their Method.field_defaults)
    grad_bits: int = 8
    num_bits_schedule: tuple[int, ...] = (3, 4, 6, 8)  # pfq: forward bits per stage
    num_grad_bits_schedule: tuple[int, ...] = (6, 6, 8, 8)  # pfq: gradient bits per stage
    num_turning_point: int = 3
    initial_threshold: float = 0.05
    decay: float = 0.3
    window: int | None = None  # iterations per indicator window; default ~ iterations / 30
    keep_fp32: tuple[str, ...] | None = None  # None: QuantConfig's default (@last)
    eval_every: int | None = None  # default: at least once per epoch and 10 times per run
    # language models (--arch transformer_lm on a text --dataset, fracfx.train.text); None: the zoo's default
    context: int | None = None  # tokens per sequence
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    save_folder: str = "runs/fracfx"
    seed: int = 0
    workers: int = 0
    device: str = "cpu"
    stochastic_grad: bool = True  # False: round gradients to nearest (deterministic; for comparisons)
    sync_bn: bool = False  # data-parallel runs: BatchNorm statistics over all ranks (runtime/sync_stats.py)
    sync_ranges: bool = False  # data-parallel runs: quantizer ranges over all ranks
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # method-specific

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if isinstance(getattr(self, field.name), MethodDefault):
                fallback = getattr(self, field.name).value
                object.__setattr__(self, field.name, get_method(self.method).field_defaults.get(field.name, fallback))
        for name in ("iters", "train_subset", "test_subset", "test_batch_size", "window", "eval_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive int (or unset), got {value!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.epochs is not None and not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise ConfigError(f"epochs must be > 0, got {self.epochs!r}")
        for name in ("lr", "lr_gamma"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.optimizer not in OPTIMIZERS:
            close = difflib.get_close_matches(str(self.optimizer), OPTIMIZERS, n=1)
            raise ConfigError(f"unknown optimizer {self.optimizer!r}" + (f"; did you mean {close[0]!r}?" if close else "") + f"; choose from {', '.join(OPTIMIZERS)}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ConfigError(f"momentum must be in [0, 1) and weight_decay >= 0, got {self.momentum!r} and {self.weight_decay!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ConfigError(f"workers must be an int >= 0, got {self.workers!r}")
        for name in ("stochastic_grad", "sync_bn", "sync_ranges"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("act_bits", "weight_bits", "grad_bits"):
            check_bits(getattr(self, name), name)
        for name in ("num_bits_schedule", "num_grad_bits_schedule", "lr_milestones", "keep_fp32"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (str, bytes)):
                    raise ConfigError(f"{name} must be a sequence, not the string {value!r}")
                object.__setattr__(self, name, tuple(value))
        if len(self.num_bits_schedule) != len(self.num_grad_bits_schedule):
            raise ConfigError(
                f"num_bits_schedule {self.num_bits_schedule} and num_grad_bits_schedule {self.num_grad_bits_schedule} "
                "must have one entry per stage each"
            )
        if self.lr_milestones is not None and list(self.lr_milestones) != sorted(set(self.lr_milestones)):
            raise ConfigError(f"lr_milestones must be increasing iterations, got {self.lr_milestones}")
        from fracfx.train.text import task_fields  # an image model on text and the like: ConfigError

        for name, value in task_fields(self).items():
            object.__setattr__(self, name, value)
        method = get_method(self.method)
        object.__setattr__(self, "options", method.check_options(dict(self.options)))

    def to_dict(self) -> dict[str, Any]:
        data = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            data[field.name] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                raise ConfigError(f"unknown TrainConfig field {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
        return cls(**data)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The numbers a run derives from its config and its data (stored in config.json)."""

    iterations: int
    batches_per_epoch: int
    lr_milestones: tuple[int, ...]
    window: int
    eval_every: int


def plan_run(config: TrainConfig, batches_per_epoch: int) -> Plan:
    if config.iters is not None:
        iterations = config.iters
    else:
        iterations = max(1, math.ceil((config.epochs if config.epochs is not None else 3) * batches_per_epoch))
    milestones = config.lr_milestones
    if milestones is None:
        milestones = tuple(sorted({max(1, iterations // 2), max(1, iterations * 3 // 4)}))
    window = config.window or max(1, round(iterations / 30))
    eval_every = config.eval_every or max(1, min(batches_per_epoch, math.ceil(iterations / 10)))
    return Plan(iterations, batches_per_epoch, tuple(milestones), window, eval_every)


# ---------------------------------------------------------------------------------------------
# Methods


@dataclasses.dataclass(frozen=True)
class Precision:
    """What a method reports about precision: bits as the cost model counts them (FP32 = 32).

    Per-sample methods (DFQ) report the mean bits of the last batch; `extra` carries anything
    else worth logging (it lands in the metrics line as method_state).
    """

    act: float
    weight: float
    grad: float
    stage: int | None = None
    turning_points: tuple[int, ...] = ()
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.act == self.weight == self.grad == 32:
            return "FP32"
        bits = f"FW{self.act}/BW{self.grad}" if self.act == self.weight else f"A{self.act}/W{self.weight}/G{self.grad}"
        return bits if self.stage is None else f"stage {self.stage} {bits}"


class Method:
    """One training recipe. Subclass, set `name`, and decorate with @register_method.

    The trainer calls build() once, then per iteration loss() before backward and
    after_step() after optimizer.step(); precision() whenever it logs; state_dict() /
    load_state_dict() for checkpoints (plain data and tensors only). The model returned by
    build() is what gets optimized (its parameters, including any gate, go to SGD).

    In a data-parallel run `ranks` is the fracfx.runtime.distributed.RankContext (else None):
    pass it as `reduce=` to the runtime objects whose decisions must be global, and fold
    per-rank statistics in synchronize().
    """

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    field_defaults: ClassVar[dict[str, Any]] = {}  # TrainConfig fields this method defaults differently

    def __init__(self, config: TrainConfig, plan: Plan, ranks=None):
        self.config, self.plan, self.ranks = config, plan, ranks
        self.model: nn.Module | None = None
        self.cost_model: nn.Module | None = None

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        known = {o.name: o for o in cls.options}
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"method {cls.name!r} has no option {key!r}{hint}; its options: {sorted(known) or 'none'}")
        return {name: options.get(name, option.default) for name, option in known.items()}

    def option(self, name: str) -> Any:
        return self.config.options[name]

    def quant_config(self, act: int, weight: int, grad: int):
        from fracfx.config import QuantConfig

        kwargs = {} if self.config.keep_fp32 is None else {"keep_fp32": self.config.keep_fp32}
        return QuantConfig(act_bits=act, weight_bits=weight, grad_bits=grad, stochastic_grad=self.config.stochastic_grad, **kwargs)

    def build(self, model: nn.Module, example_input: torch.Tensor) -> nn.Module:
        """Return the model to train; also set self.cost_model (a transformed graph for CostMeter)."""
        raise NotImplementedError

    def cost_meter(self):
        """An object with step(batch_size), summary(), state_dict(), load_state_dict()."""
        from fracfx.runtime import CostMeter

        return CostMeter(self.cost_model)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate (DFQ adds its cost term here)."""
        return ce

    def after_step(self, loss: float) -> None:
        """Called after optimizer.step() with this iteration's cross-entropy (data-parallel: this
        rank's share of the global batch's mean cross-entropy; the shares sum to it)."""

    def synchronize(self) -> None:
        """Data-parallel runs only: called on every rank at each evaluation, before the metrics
        record and the checkpoint; fold per-rank statistics into state every rank shares."""

    def after_evaluate(self) -> None:
        """Called after each evaluation's metrics record, before its checkpoint (reset per-window state here)."""

    def export_model(self) -> nn.Module:
        """The trained model at one fixed precision, for `fracfx export` / `fracfx inspect` (DFQ pins its gates)."""
        return self.model

    def precision(self) -> Precision:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


METHODS: dict[str, type[Method]] = {}
_loaded_plugins = False


def register_method(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ConfigError(f"{cls.__name__} needs a `name` to be registered")
    METHODS[cls.name] = cls
    return cls


def _load_plugins() -> None:
    global _loaded_plugins
    if _loaded_plugins:
        return
    _loaded_plugins = True
    for module in METHOD_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise


def available_methods() -> dict[str, type[Method]]:
    _load_plugins()
    return dict(METHODS)


def get_method(name: str) -> type[Method]:
    methods = available_methods()
    if name not in methods:
        close = difflib.get_close_matches(str(name), methods, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown method {name!r}{hint}; choose from {', '.join(methods)}")
    return methods[name]


def _fp32_cost_graph(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """A transformed copy at 0 bits everywhere: the MAC counts CostMeter needs, FP32 costs."""
    from fracfx.api import transform
    from fracfx.config import QuantConfig

    return transform(copy.deepcopy(model), QuantConfig(act_bits=0, weight_bits=0, grad_bits=0, keep_fp32=()), example_inputs=example_input)


@register_method
class FP32Method(Method):
    name = "fp32"
    help = "plain FP32 training (the float model, untransformed)"

    def build(self, model, example_input):
        self.model = model
        self.cost_model = _fp32_cost_graph(model, example_input)
        return model

    def precision(self) -> Precision:
        return Precision(32, 32, 32)


@register_method
class StaticMethod(Method):
    name = "static"
    help = "fixed --act_bits/--weight_bits/--grad_bits for the whole run (default 8/8/8)"

    def build(self, model, example_input):
        from fracfx.api import seed_rounding, transform

        c = self.config
        self.model = transform(model, self.quant_config(c.act_bits, c.weight_bits, c.grad_bits), example_inputs=example_input)
        seed_rounding(self.model, c.seed)
        self.cost_model = self.model
        return self.model

    def precision(self) -> Precision:
        c = self.config
        return Precision(cost_bits(c.act_bits), cost_bits(c.weight_bits), cost_bits(c.grad_bits))


@register_method
class PFQMethod(Method):
    name = "pfq"
    help = "progressive fractional quantization: --num_bits_schedule / --num_grad_bits_schedule, raised on loss plateaus"

    def build(self, model, example_input):
        from fracfx.api import seed_rounding, transform
        from fracfx.runtime import PFQScheduler

        c = self.config
        fw, bw = c.num_bits_schedule, c.num_grad_bits_schedule
        self.model = transform(model, self.quant_config(fw[0], fw[0], bw[0]), example_inputs=example_input)
        seed_rounding(self.model, c.seed)
        self.scheduler = PFQScheduler(
            self.model, fw, bw, num_turning_point=c.num_turning_point, initial_threshold=c.initial_threshold,
            decay=c.decay, window=self.plan.window, reduce=self.ranks,
        )
        self.cost_model = self.model
        return self.model

    def after_step(self, loss: float) -> None:
        self.scheduler.step(loss)

    def synchronize(self) -> None:
        self.scheduler.tracker.sync()

    def precision(self) -> Precision:
        a, w, g = self.scheduler.bits
        extra = {"threshold": self.scheduler.threshold, "last_max_difference": self.scheduler.tracker.indicator.last_max_difference}
        return Precision(a, w, g, self.scheduler.stage, tuple(i for i, _ in self.scheduler.turning_points), extra)

    def state_dict(self):
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state):
        self.scheduler.load_state_dict(state["scheduler"])


# ---------------------------------------------------------------------------------------------
# Tasks: what the data is, the model and example input it needs, how predictions are scored


class ImageTask:
    """Image classification (fracfx.data, top-1 accuracy); fracfx.train.text.LanguageModelTask is the other task."""

    metric = "acc"

    def __init__(self, config: TrainConfig):
        self.config = config

    @staticmethod
    def build_loaders(*args, **kwargs):
        from fracfx.data import build_loaders

        return build_loaders(*args, **kwargs)

    def dataset_info(self) -> dict[str, Any]:
        from fracfx.data import build_datasets

        c = self.config
        return build_datasets(c.dataset, datadir=c.datadir, download=False, seed=c.seed)[2].to_dict()

    def float_model(self, info: dict[str, Any]) -> nn.Module:
        from fracfx.models import build_model

        size = int(info["input_size"])
        return build_model(self.config.arch, num_classes=int(info["num_classes"]), in_channels=int(info["in_channels"]), input_size=(size, size))

    def example_input(self, info: dict[str, Any], batch: int) -> torch.Tensor:
        size = int(info["input_size"])
        return torch.zeros(batch, int(info["in_channels"]), size, size)

    def add_metrics(self, record: dict[str, Any]) -> None:
        """Task-specific entries of a metrics line (none for images)."""


def task_for(config: TrainConfig):
    """ImageTask, or LanguageModelTask for the text datasets (fracfx.data.text.TEXT_DATASETS)."""
    from fracfx.data.text import TEXT_DATASETS

    if config.dataset in TEXT_DATASETS:
        from fracfx.train.text import LanguageModelTask

        return LanguageModelTask(config)
    return ImageTask(config)


def _predictions(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, classes), labels (N,)): a language model's (B, T, vocab) logits are B * T predictions."""
    return outputs.flatten(0, -2), targets.flatten()


# ---------------------------------------------------------------------------------------------
# RNG state as plain data


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Files


def _write_atomic(path: Path, text: str) -> None:
    from fracfx.runtime.checkpoint import atomic_write

    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def _json_line(record: dict) -> str:
    return json.dumps(record, sort_keys=True, allow_nan=True) + "\n"


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def resolve_checkpoint(resume: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory holding checkpoint.pt."""
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; --resume takes a run directory or its {CHECKPOINT}")
    return path


# ---------------------------------------------------------------------------------------------
# Trained models back from checkpoints (fracfx export / fracfx inspect)


@dataclasses.dataclass
class TrainedCheckpoint:
    """A training checkpoint rebuilt: config, plan, dataset info, the method (state loaded) and its model."""

    path: Path
    config: TrainConfig
    plan: Plan
    dataset: dict[str, Any]
    method: Method
    model: nn.Module
    example_input: torch.Tensor
    state: dict[str, Any]


def _dataset_info(state: dict, path: Path, config: TrainConfig) -> dict[str, Any]:
    """The checkpoint's own record, else config.json beside it, else the dataset itself."""
    if isinstance(state.get("dataset"), dict):
        return dict(state["dataset"])
    beside = path.parent / CONFIG
    if beside.is_file():
        saved = json.loads(beside.read_text(encoding="utf-8"))
        if saved.get("config") == state["config"] and isinstance(saved.get("dataset"), dict):
            return saved["dataset"]
    return task_for(config).dataset_info()


def load_trained(path: str | os.PathLike) -> TrainedCheckpoint:
    """Rebuild the model of a `fracfx train` checkpoint (a run directory or its checkpoint.pt).

    The model is rebuilt the way the run built it (the method's build() on the float model of
    the stored config), then the checkpoint's weights, quantizer state and method state (DFQ
    controller, FracTrain scheduler) are loaded; the file is read with weights_only=True
    (runtime/checkpoint.py). The model is returned in eval mode. Global RNG state is untouched.
    """
    from fracfx.runtime.checkpoint import load_checkpoint

    path = resolve_checkpoint(path)
    state = load_checkpoint(path)
    if state.get("kind") != RUN_KIND:
        raise CheckpointError(f"{path} is a fracfx checkpoint but not of a training run (kind {state.get('kind')!r})")
    config = TrainConfig.from_dict(state["config"])
    plan = Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["plan"].items()})
    info = _dataset_info(state, path, config)
    task = task_for(config)
    with torch.random.fork_rng(devices=[]):  # building draws initial weights; they are overwritten below
        float_model = task.float_model(info)
        method = get_method(config.method)(config, plan)
        model = method.build(float_model, task.example_input(info, 2))
    try:
        model.load_state_dict(state["model"])
        method.load_state_dict(state["method"])
    except (RuntimeError, KeyError, ConfigError) as error:
        raise CheckpointError(f"{path} does not fit the model its config builds ({type(error).__name__}: {error})") from error
    model.eval()
    return TrainedCheckpoint(path, config, plan, info, method, model, task.example_input(info, 1), state)


def model_from_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, torch.Tensor]:
    """(fixed-precision GraphModule, example input) of a training checkpoint, for fracfx export."""
    loaded = load_trained(path)
    return fixed_precision_model(loaded), loaded.example_input


def fixed_precision_model(loaded: TrainedCheckpoint) -> nn.Module:
    """The GraphModule `fracfx export` writes for a loaded checkpoint, in eval mode.

    Quantized runs give their transformed model at the bits in force at the checkpoint; DFQ and
    FracTrain runs give it with every gated block pinned at its most used candidate (see
    fracfx.train.dfq); an FP32 run gives its float model traced with 0-bit (FP32) quantizers.
    """
    from torch import fx

    gm = loaded.method.export_model()
    if not isinstance(gm, fx.GraphModule):
        from fracfx.api import transform
        from fracfx.config import QuantConfig

        gm = transform(gm, QuantConfig(act_bits=0, weight_bits=0, grad_bits=0, keep_fp32=()), example_inputs=loaded.example_input)
    return gm.eval()


# ---------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module
    metrics: list[dict]
    summary: dict


def evaluate(model: nn.Module, loader, device: torch.device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in %) over the loader, in eval mode."""
    return _loss_and_accuracy(*evaluate_sums(model, loader, device))


@torch.no_grad()
def evaluate_sums(model: nn.Module, loader, device: torch.device) -> tuple[float, int, int]:
    """(summed cross-entropy, correct predictions, samples) over the loader, in eval mode."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        outputs, targets = _predictions(model(inputs), targets)
        total_loss += float(F.cross_entropy(outputs, targets, reduction="sum"))
        correct += int((outputs.argmax(1) == targets).sum())
        count += len(targets)
    model.train(was_training)
    return total_loss, correct, count


def _loss_and_accuracy(total_loss: float, correct: int, count: int) -> tuple[float, float]:
    return total_loss / max(count, 1), 100.0 * correct / max(count, 1)


def train(
    config: TrainConfig | None = None,
    *,
    resume: str | os.PathLike | None = None,
    progress: bool | None = None,
    console=None,
    log_every: int = 0,
    crash_after: int | None = None,
    crash_rank: int = 0,
) -> TrainResult:
    """Train (or resume) a run; returns the model, metrics and summary.

    config: required for a fresh run; with resume, the checkpoint's config is used and a given
      config must agree with it (fields left at their defaults are not compared; `workers` and
      `device` may change).
    progress: None shows a live display only on a terminal.
    log_every: without the live display, also print a short line every N iterations (0: only
      at evaluations).
    crash_after: SIGKILL this process right after that iteration (tests of resume use it); in a
      data-parallel run only rank `crash_rank`, and only in torchrun's first attempt.

    Run by torchrun with WORLD_SIZE > 1, every rank calls this: DistributedDataParallel on the
    process group (gloo on CPU, nccl on CUDA), --batch_size split over the ranks, schedules
    decided on global statistics, checkpoints written by rank 0 (see fracfx.runtime.distributed).
    After an elastic restart (torchrun --max-restarts) a run whose --save_folder holds a
    checkpoint resumes from it.
    """
    from rich.console import Console

    from fracfx.runtime import distributed

    launch = distributed.launch_environment()
    main = launch is None or launch.rank == 0
    console = console or Console()
    if not main:
        console = Console(file=io.StringIO())
    config, run_dir, state = _open_run(config, resume, restart_count=0 if launch is None else launch.restart_count, console=console)
    ranks = None if launch is None else distributed.start(launch, config.device)
    session, previous_handler = None, None
    if ranks is not None and threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        session = _Session(config, run_dir, ranks)
        if state is not None:
            session.restore(state)
        else:
            session.start()
        title = f"{config.method} {config.arch} {config.dataset}" + ("" if ranks is None else f" on {ranks.world_size} ranks")
        display = _Display(console, session.plan.iterations, session.iteration, enabled=progress if main else False,
                           title=title, log_every=log_every)
        display.perplexity = session.task.metric == "ppl"
        crash_here = crash_after is not None and (launch is None or (launch.rank == crash_rank and launch.restart_count == 0))
        _run_loop(session, display, crash_after if crash_here else None)
    except Exception as error:
        if ranks is None or not (isinstance(error, distributed.Terminated) or distributed.is_peer_failure(error)):
            raise
        iteration = 0 if session is None else session.iteration
        saved = None if session is None else session.checkpoint_iteration
        if isinstance(error, distributed.Terminated):
            raise DistributedError(distributed.terminated_message(ranks, iteration, saved, run_dir)) from None
        raise DistributedError(distributed.peer_failure_message(ranks, iteration, saved, run_dir, error)) from error
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        distributed.stop(ranks)
    summary = _summary(config, session.plan, session.metrics, session.meter.summary(), session.elapsed())
    if ranks is not None:
        summary["ranks"] = ranks.world_size
    if main:
        _write_atomic(run_dir / SUMMARY, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    console.print(summary_table(summary))
    return TrainResult(run_dir, session.model, session.metrics, summary)


def _run_loop(session: "_Session", display: "_Display", crash_after: int | None) -> None:
    from fracfx.data import train_batches

    with display:
        if session.finished:
            return
        for index, inputs, targets in train_batches(session.train_loader, session.iteration):
            loss = session.step(index, inputs, targets)
            if crash_after is not None and session.iteration == crash_after:
                os.kill(os.getpid(), signal.SIGKILL)
            display.update(session.iteration, loss, session.train_acc, session.method.precision(), session.meter.summary())
            if session.iteration % session.plan.eval_every == 0 or session.finished:
                record = session.evaluate_and_checkpoint()
                display.test_acc, display.test_ppl = record["test_acc"], record.get("test_ppl")
                display.log(_eval_line(record))
            if session.finished:
                return


def _raise_terminated(signum, frame):
    from fracfx.runtime.distributed import Terminated

    raise Terminated()


def _open_run(config: TrainConfig | None, resume, *, restart_count: int = 0, console=None) -> tuple[TrainConfig, Path, dict | None]:
    """(config, run directory, checkpoint payload or None) for a fresh or a resumed run.

    restart_count > 0 (torchrun restarted the workers): a fresh run's folder that already holds
    a checkpoint is resumed from it, as the restarted job's command line is the first one.
    """
    from fracfx.runtime.checkpoint import load_checkpoint

    if resume is None:
        if config is None:
            raise ConfigError("train() needs a TrainConfig (or resume=RUN_DIR)")
        run_dir = Path(config.save_folder)
        if (run_dir / CHECKPOINT).exists():
            if not restart_count:
                raise ConfigError(f"{run_dir} already holds a run; resume it with --resume {run_dir}, or choose another --save_folder")
            if console is not None:
                console.print(f"torchrun restart {restart_count}: resuming {run_dir} from its last checkpoint")
            resume = run_dir
        else:
            return config, run_dir, None
    path = resolve_checkpoint(resume)
    state = load_checkpoint(path)
    if state.get("kind") != RUN_KIND:
        raise CheckpointError(f"{path} is a fracfx checkpoint but not of a training run (kind {state.get('kind')!r})")
    saved = TrainConfig.from_dict(state["config"])
    if config is not None:
        _check_same_config(saved, config)
        defaults = TrainConfig(method=config.method)
        saved = saved.replace(**{k: getattr(config, k) for k in RESUME_OVERRIDABLE if getattr(config, k) != getattr(defaults, k)})
    return saved, path.parent, state


def _fresh_window() -> dict[str, float | int]:
    return {"loss": 0.0, "correct": 0, "samples": 0, "steps": 0}


class _Session:
    """The live objects of one run; payload() and restore() are its checkpoint.

    `ranks` (a RankContext, data-parallel runs) or None. Distributed, `train_model` is the DDP
    wrapper (forward and backward go through it) and `model` the module inside it (evaluation,
    checkpoints); each rank holds its share of every batch and of the test set.
    """

    def __init__(self, config: TrainConfig, run_dir: Path, ranks=None):
        self.config, self.run_dir, self.ranks = config, run_dir, ranks
        self.is_main = ranks is None or ranks.is_main
        run_dir.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(config.device) if ranks is None else ranks.device
        seed_everything(config.seed)
        rank, world = (0, 1) if ranks is None else (ranks.rank, ranks.world_size)
        self.task = task_for(config)
        self.train_loader, self.test_loader, self.info = self.task.build_loaders(
            config.dataset, datadir=config.datadir, batch_size=config.batch_size, test_batch_size=config.test_batch_size,
            workers=config.workers, seed=config.seed, download=config.download,
            train_subset=config.train_subset, test_subset=config.test_subset, rank=rank, world_size=world,
        )
        self.plan = plan_run(config, self.train_loader.batch_sampler.batches_per_epoch)
        info = self.info.to_dict()
        float_model = self.task.float_model(info)
        self.method = get_method(config.method)(config, self.plan, ranks=ranks)
        self.model = self.method.build(float_model, self.task.example_input(info, 2)).to(self.device)
        self.model.train()
        self.meter = self.method.cost_meter()
        self.train_model = self.model if ranks is None else self._data_parallel()
        if config.optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=list(self.plan.lr_milestones), gamma=config.lr_gamma)
        self.iteration, self.metrics, self.window = 0, [], _fresh_window()
        self.checkpoint_iteration: int | None = None
        self._elapsed_before, self._started = 0.0, time.perf_counter()

    def _data_parallel(self) -> nn.Module:
        """Per-rank random streams (rank 0 keeps the single-process ones), synced statistics, DDP."""
        from fracfx.api import seed_rounding
        from fracfx.runtime.distributed import data_parallel, seed_for_rank

        if self.ranks.rank:
            seed_rounding(self.model, seed_for_rank(self.config.seed, self.ranks.rank))
            seed_everything(seed_for_rank(self.config.seed, self.ranks.rank))
        return data_parallel(self.model, self.ranks, sync_bn=self.config.sync_bn, sync_ranges=self.config.sync_ranges)

    @property
    def finished(self) -> bool:
        return self.iteration >= self.plan.iterations

    @property
    def train_acc(self) -> float:
        return 100.0 * self.window["correct"] / max(self.window["samples"], 1)

    def elapsed(self) -> float:
        return self._elapsed_before + (time.perf_counter() - self._started)

    def start(self) -> None:
        if not self.is_main:
            return
        (self.run_dir / METRICS).unlink(missing_ok=True)
        _write_atomic(self.run_dir / CONFIG, json.dumps(
            {"config": self.config.to_dict(), "plan": dataclasses.asdict(self.plan), "dataset": self.info.to_dict(),
             "method_help": self.method.help, "torch": torch.__version__}, indent=2, sort_keys=True) + "\n")

    def step(self, index: int, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """One training iteration; returns its cross-entropy (data-parallel: over this rank's share)."""
        if index != self.iteration:
            raise RuntimeError(f"data stream at iteration {index}, training at {self.iteration}")
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        outputs = self.train_model(inputs)
        logits, labels = _predictions(outputs, targets)
        ce = F.cross_entropy(logits, labels)
        share = global_batch = None
        if self.ranks is not None:
            # DDP averages gradients over ranks: weighting each rank's mean by its share of the
            # global batch (times the world size) makes that average the global batch's gradient.
            global_batch = self.train_loader.batch_sampler.global_batch_size(index % self.plan.batches_per_epoch)
            share = len(targets) / global_batch
        loss = self.method.loss(outputs, targets, ce if share is None else ce * (share * self.ranks.world_size))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.lr_schedule.step()
        self.meter.step(len(targets) if global_batch is None else global_batch)  # at the bits in force during this step
        ce_value = float(ce.detach())
        self.method.after_step(ce_value if share is None else ce_value * share)  # a switch decided here applies from the next step
        self.iteration += 1
        self.window["loss"] += ce_value * len(labels)
        self.window["correct"] += int((logits.detach().argmax(1) == labels).sum())
        self.window["samples"] += len(labels)
        self.window["steps"] += 1
        return ce_value

    def _evaluate(self) -> tuple[float, float, dict]:
        """(test loss, test accuracy, training window): over all ranks in a data-parallel run."""
        if self.ranks is None:
            return (*evaluate(self.model, self.test_loader, self.device), self.window)
        self.ranks.broadcast_buffers(self.model)  # evaluate every shard with rank 0's running statistics
        w = self.window
        total = self.ranks.sum([*evaluate_sums(self.model, self.test_loader, self.device), w["loss"], w["correct"], w["samples"]])
        self.method.synchronize()
        window = dict(w, loss=total[3], correct=round(total[4]), samples=round(total[5]))
        return (*_loss_and_accuracy(total[0], round(total[1]), round(total[2])), window)

    def evaluate_and_checkpoint(self) -> dict:
        """Evaluate, append the metrics record, checkpoint (atomically), then log the line."""
        from fracfx.runtime.checkpoint import save_checkpoint

        test_loss, test_acc, window = self._evaluate()
        record = _metrics_record(self.iteration, self.plan, window, test_loss, test_acc, self.lr_schedule,
                                 self.method.precision(), self.meter.summary())
        self.task.add_metrics(record)  # language models: train_ppl, test_ppl
        record[TIMING_KEY] = {"elapsed_s": round(self.elapsed(), 3), "unix_time": round(time.time(), 3)}
        self.metrics.append(record)
        self.window = _fresh_window()
        self.method.after_evaluate()
        rank_states = None if self.ranks is None else self._rank_states()
        self.checkpoint_iteration = self.iteration
        if not self.is_main:
            return record
        save_checkpoint(self.run_dir / CHECKPOINT, self.payload(rank_states))
        # After the checkpoint: a crash in between is repaired by restore(), which rewrites
        # metrics.jsonl from the checkpoint's own list.
        with open(self.run_dir / METRICS, "a", encoding="utf-8") as handle:
            handle.write(_json_line(record))
        return record

    def _rank_states(self) -> list[dict[str, Any]]:
        """Every rank's own random streams and fingerprint (a collective); refuses ranks that drifted apart."""
        from fracfx.runtime.distributed import check_fingerprints, fingerprint, rounding_state

        precision = self.method.precision()
        schedule = {"bits": [precision.act, precision.weight, precision.grad], "stage": precision.stage,
                    "turning_points": list(precision.turning_points)}
        mine = {"rng": rng_state(), "rounding": rounding_state(self.model),
                "fingerprint": fingerprint(self.model, self.iteration, schedule)}
        states = self.ranks.gather(mine)
        check_fingerprints([s["fingerprint"] for s in states])
        return states

    def payload(self, rank_states: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        per_epoch = self.plan.batches_per_epoch
        payload = {
            "kind": RUN_KIND, "finished": self.finished, "iteration": self.iteration,
            "config": self.config.to_dict(), "plan": dataclasses.asdict(self.plan),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(), "method": self.method.state_dict(),
            "cost": self.meter.state_dict(), "rng": rng_state(),
            "data": {"seed": self.config.seed, "epoch": self.iteration // per_epoch, "batch": self.iteration % per_epoch},
            "metrics": self.metrics, "accumulators": dict(self.window), "elapsed_s": self.elapsed(),
            "dataset": self.info.to_dict(),
        }
        if rank_states is not None:  # data-parallel: each rank's streams, to resume every rank exactly
            payload["distributed"] = {"world_size": len(rank_states), "ranks": rank_states}
        return payload

    def restore(self, state: dict[str, Any]) -> None:
        if _plain(state["plan"]) != _plain(dataclasses.asdict(self.plan)):
            raise CheckpointError(
                f"the checkpoint was planned as {state['plan']} but this data gives {dataclasses.asdict(self.plan)}; "
                "resume with the same dataset, subset and batch size"
            )
        saved_world = state.get("distributed", {}).get("world_size", 1)
        world = 1 if self.ranks is None else self.ranks.world_size
        if saved_world != world:
            launch = "plain `fracfx train`" if saved_world == 1 else f"torchrun with {saved_world} processes in total"
            raise CheckpointError(
                f"this checkpoint was written by a run of {saved_world} process(es) but this run has {world}; "
                f"resume it with {launch} (each rank's random streams are part of the checkpoint)"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.method.load_state_dict(state["method"])
        self.meter.load_state_dict(state["cost"])
        set_rng_state(state["rng"])
        if self.ranks is not None:
            from fracfx.runtime.distributed import set_rounding_state

            mine = state["distributed"]["ranks"][self.ranks.rank]
            set_rng_state(mine["rng"])
            set_rounding_state(self.model, mine["rounding"])
        self.iteration, self.metrics = int(state["iteration"]), list(state["metrics"])
        self.checkpoint_iteration = self.iteration
        self.window = dict(state["accumulators"])
        self._elapsed_before, self._started = float(state.get("elapsed_s", 0.0)), time.perf_counter()
        # Lines written after the checkpoint belong to iterations that will be redone.
        if self.is_main:
            _write_atomic(self.run_dir / METRICS, "".join(_json_line(m) for m in self.metrics))


def _plain(value):
    """Tuples as lists, recursively: how a plan compares after a round trip through a checkpoint."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check_same_config(saved: TrainConfig, given: TrainConfig) -> None:
    defaults = TrainConfig(method=given.method)
    for field in dataclasses.fields(TrainConfig):
        value = getattr(given, field.name)
        if field.name in RESUME_OVERRIDABLE:
            continue
        if field.name == "options":
            for key, option_value in value.items():
                if option_value != defaults.options.get(key) and option_value != saved.options.get(key):
                    raise ConfigError(f"--{key} {option_value!r} differs from the resumed run's {saved.options.get(key)!r}; a resumed run keeps its config")
            continue
        if value != getattr(defaults, field.name) and value != getattr(saved, field.name):
            raise ConfigError(
                f"--{field.name} {value!r} differs from the resumed run's {getattr(saved, field.name)!r}; "
                "a resumed run keeps the config it started with (drop the flag, or start a new run)"
            )


def _metrics_record(iteration, plan, window, test_loss, test_acc, lr_schedule, precision: Precision, cost: dict) -> dict:
    samples = max(window["samples"], 1)
    return {
        "iteration": iteration,
        "epoch": iteration / plan.batches_per_epoch,
        "lr": lr_schedule.get_last_lr()[0],
        "train_loss": window["loss"] / samples,
        "train_acc": 100.0 * window["correct"] / samples,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "stage": precision.stage,
        "bits": {"act": precision.act, "weight": precision.weight, "grad": precision.grad},
        "turning_points": list(precision.turning_points),
        "method_state": precision.extra,
        "effective_macs": cost["effective_macs"],
        "fp32_effective_macs": cost["fp32_effective_macs"],
        "sbm_effective_macs": cost["sbm_effective_macs"],
        "cost_vs_fp32": cost["ratio_vs_fp32"],
        "cost_vs_sbm": cost["ratio_vs_sbm"],
    }


def _eval_line(record: dict) -> str:
    stage = "" if record["stage"] is None else f" stage {record['stage']}"
    b = record["bits"]
    state = record.get("method_state") or {}
    steer = f"  cp {state['cp']:.3f}% (set-point {state['target']:g})" if state.get("cp") is not None and "target" in state else ""
    return (
        f"iter {record['iteration']:>6}  epoch {record['epoch']:.2f}  train loss {record['train_loss']:.4f}  "
        f"{_score_text(record)}{stage}  bits A{b['act']}/W{b['weight']}/G{b['grad']}{steer}  "
        f"cost {100 * record['cost_vs_sbm']:.1f}% of static 8-bit"
    )


def _score_text(record: dict) -> str:
    if "test_ppl" in record:  # a language model (fracfx.train.text): perplexity on the validation split
        return f"train ppl {record['train_ppl']:.3f}  valid ppl {record['test_ppl']:.3f}"
    return f"test acc {record['test_acc']:.2f}%"


def _summary(config: TrainConfig, plan: Plan, metrics: list[dict], cost: dict, elapsed: float) -> dict:
    last = metrics[-1] if metrics else {}
    summary = {
        "method": config.method,
        "arch": config.arch,
        "dataset": config.dataset,
        "iterations": plan.iterations,
        "final_test_acc": last.get("test_acc"),
        "best_test_acc": max((m["test_acc"] for m in metrics), default=None),
        "final_train_loss": last.get("train_loss"),
        "turning_points": last.get("turning_points", []),
        "final_bits": last.get("bits"),
        **{k: cost[k] for k in ("effective_macs", "fp32_effective_macs", "sbm_effective_macs", "ratio_vs_fp32", "ratio_vs_sbm")},
        "savings_vs_sbm": 1.0 - cost["ratio_vs_sbm"],
        "savings_vs_fp32": 1.0 - cost["ratio_vs_fp32"],
        "elapsed_s": round(elapsed, 1),
    }
    if "test_ppl" in last:  # a language model: validation perplexity, exp(mean token NLL)
        summary.update(final_test_ppl=last["test_ppl"], best_test_ppl=min(m["test_ppl"] for m in metrics), final_train_ppl=last["train_ppl"])
    return summary


def summary_table(summary: dict):
    from rich.table import Table

    table = Table(title=f"fracfx train: {summary['method']} {summary['arch']} on {summary['dataset']}")
    table.add_column("")
    table.add_column("value", justify="right")
    acc = summary["final_test_acc"]
    rows = [
        ("iterations", f"{summary['iterations']}"),
        ("final test accuracy", "-" if acc is None else f"{acc:.2f} %"),
        ("best test accuracy", "-" if summary["best_test_acc"] is None else f"{summary['best_test_acc']:.2f} %"),
        ("turning points (iteration)", ", ".join(map(str, summary["turning_points"])) or "-"),
        ("effective MACs", f"{summary['effective_macs']:.4g}"),
        ("vs FP32 training", f"{100 * summary['ratio_vs_fp32']:.2f} %"),
        ("vs static 8-bit training", f"{100 * summary['ratio_vs_sbm']:.2f} %  (saves {100 * summary['savings_vs_sbm']:.1f} %)"),
        ("wall time", f"{summary['elapsed_s']:.0f} s"),
    ]
    if "final_test_ppl" in summary:
        rows[1:3] = [("final validation perplexity", f"{summary['final_test_ppl']:.3f}"),
                     ("best validation perplexity", f"{summary['best_test_ppl']:.3f}")]
    for row in rows:
        table.add_row(*row)
    return table


class _Display:
    """A rich live progress bar on a terminal; plain lines at each evaluation otherwise."""

    def __init__(self, console, total: int, start: int, *, enabled: bool | None, title: str, log_every: int = 0):
        self.console, self.log_every = console, log_every
        self.enabled = console.is_terminal if enabled is None else enabled
        self.total, self.start, self.title = total, start, title
        self.progress = None
        self.test_acc: float | None = None
        self.perplexity, self.test_ppl = False, None  # a language model: perplexities instead of accuracy

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=self.console, transient=False,
            )
            self.progress.__enter__()
            self.task = self.progress.add_task(self.title, total=self.total, completed=self.start, status="")
        else:
            self.console.print(f"{self.title}: {self.total} iterations" + (f", resuming at {self.start}" if self.start else ""))
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False

    def update(self, iteration: int, loss: float, train_acc: float, precision: Precision, cost: dict) -> None:
        plain = self.progress is None
        if plain and not (self.log_every and iteration % self.log_every == 0):
            return
        test = "" if self.test_acc is None else f"  test acc {self.test_acc:.2f}%"
        score = f"train acc {train_acc:.1f}%"
        if self.perplexity:
            score, test = f"ppl {math.exp(min(loss, 700)):.3f}", "" if self.test_ppl is None else f"  valid ppl {self.test_ppl:.3f}"
        status = (f"loss {loss:.3f}  {score}{test}  {precision.label}  "
                  f"cost {100 * cost['ratio_vs_sbm']:.0f}% of 8-bit")
        if plain:
            self.console.print(f"iter {iteration:>6}/{self.total}  {status}", highlight=False, soft_wrap=True)
        else:
            self.progress.update(self.task, completed=iteration, status=status)

    def log(self, line: str) -> None:
        (self.progress.console if self.progress is not None else self.console).print(line, highlight=False, soft_wrap=True)
