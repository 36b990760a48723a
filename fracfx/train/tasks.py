"""Tasks: what the data is, the model and example input it needs, how predictions are scored.

ImageTask: image classification on fracfx.data's datasets, scored by top-1 accuracy.
LanguageModelTask: --arch transformer_lm on --dataset kjv | wikitext103.

    fracfx train --arch transformer_lm --dataset kjv --context 64 --d-model 128 --n-layers 2 --n-heads 4 \\
                 --method fractrain --weight-bits 4 --target-ratio 1.5 --save-folder runs/kjv/fractrain

The language-model task: the loaders of fracfx.data.text (training windows keyed by (epoch,
index), so a resumed run sees exactly the batches of an uninterrupted one), the zoo's
transformer_lm sized by --context/--d-model/--n-layers/--n-heads (unset: the factory's
defaults), and the example input (B, context) of int64 token ids, so every MAC count and the
cost meter are per sequence of `context` tokens. The loss is the token-level cross-entropy
(every position predicts the next token); evaluation runs on the validation split and each
metrics line adds train_ppl and test_ppl = exp(mean token NLL) to the loss and the next-token
accuracy (train_acc, test_acc). --train-subset/--test-subset keep the first N windows.

Precision: an LM has no stem, its first compute op is the query projection inside the first
gated block, so with --keep-fp32 unset every method keeps only the head (@last) in FP32
(DFQConfig's default would also keep blocks.0.attn.query there; docs/method.md section 1).

A task's interface: metric, build_loaders (fracfx.data.build_loaders's arguments),
dataset_info, float_model, example_input, add_metrics (task entries of a metrics line),
score_text / live_score / score_row (display, inspect), summary_fields / summary_rows (summary.json, its table).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import torch
from torch import nn

from fracfx.data.text import TEXT_DATASETS
from fracfx.errors import ConfigError


class ImageTask:
    """Image classification (fracfx.data, top-1 accuracy)."""

    metric = "acc"

    def __init__(self, config):
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

    def score_text(self, record: dict[str, Any]) -> str:
        return f"test acc {record['test_acc']:.2f}%"

    def live_score(self, loss: float, train_acc: float, last: dict[str, Any] | None) -> str:
        return f"train acc {train_acc:.1f}%" + ("" if last is None else f"  test acc {last['test_acc']:.2f}%")

    def score_row(self, record: dict[str, Any]) -> tuple[str, str]:
        return "test accuracy at the last evaluation", f"{record['test_acc']:.2f} %"

    def summary_fields(self, metrics: list[dict[str, Any]]) -> dict[str, Any]:
        return {}

    def summary_rows(self, summary: dict[str, Any]) -> list[tuple[str, str]]:
        acc, best = summary["final_test_acc"], summary["best_test_acc"]
        return [("final test accuracy", "-" if acc is None else f"{acc:.2f} %"),
                ("best test accuracy", "-" if best is None else f"{best:.2f} %")]


def task_for(config):
    """ImageTask, or LanguageModelTask for the text datasets (fracfx.data.text.TEXT_DATASETS)."""
    return LanguageModelTask(config) if config.dataset in TEXT_DATASETS else ImageTask(config)


def predictions(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, classes), labels (N,)): a language model's (B, T, vocab) logits are B * T predictions."""
    return outputs.flatten(0, -2), targets.flatten()


LM_ARCHS = ("transformer_lm",)
SIZE_FIELDS = ("context", "d_model", "n_layers", "n_heads")  # TrainConfig fields -> transformer_lm arguments
LM_KEEP_FP32 = ("@last",)


def _is_factory(arch: str) -> bool:
    return ":" in arch  # `pkg.module:factory`: the user's own model, trusted to fit the data


def task_fields(config) -> dict[str, Any]:
    """TrainConfig fields the task resolves; raises ConfigError for a model that does not fit the data."""
    for name in SIZE_FIELDS:
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive int (or unset), got {value!r}")
    if config.dataset not in TEXT_DATASETS:
        if config.arch in LM_ARCHS:
            raise ConfigError(
                f"--arch {config.arch} is a language model over token ids, but --dataset {config.dataset} holds images; "
                f"use --dataset {' or '.join(TEXT_DATASETS)} (wikitext103 with --datadir), or an image model such as --arch cifar_resnet38"
            )
        given = [f"--{name.replace('_', '-')}" for name in SIZE_FIELDS if getattr(config, name) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} size a language model (--arch transformer_lm on --dataset kjv or wikitext103); drop them for --dataset {config.dataset}")
        return {}
    if config.arch not in LM_ARCHS and not _is_factory(config.arch):
        raise ConfigError(
            f"--dataset {config.dataset} is text (next-token prediction) but --arch {config.arch} is an image model; "
            f"use --arch {LM_ARCHS[0]} (sized by --context, --d-model, --n-layers, --n-heads)"
        )
    return {"keep_fp32": LM_KEEP_FP32} if config.keep_fp32 is None else {}


def _factory_default(name: str) -> Any:
    from fracfx.models.transformer_lm import transformer_lm

    return inspect.signature(transformer_lm).parameters[name].default


class LanguageModelTask:
    """Next-token prediction on a text corpus, scored by perplexity (see the module docstring)."""

    metric = "ppl"

    def __init__(self, config):
        self.config = config
        self.context = config.context or _factory_default("context")

    def _corpus(self, name: str, datadir, train_subset: int | None, test_subset: int | None):
        from fracfx.data.text import load_corpus

        corpus = load_corpus(name, datadir=datadir)
        if train_subset is not None:  # N windows at every epoch offset: (N + 1) * context tokens
            corpus = dataclasses.replace(corpus, train=corpus.train[:(train_subset + 1) * self.context])
        if test_subset is not None:
            corpus = dataclasses.replace(corpus, valid=corpus.valid[:test_subset * self.context + 1])
        return corpus

    def build_loaders(self, name: str, *, datadir=None, batch_size: int = 32, test_batch_size: int | None = None, workers: int = 0,
                      seed: int = 0, download: bool = False, train_subset: int | None = None, test_subset: int | None = None,
                      rank: int = 0, world_size: int = 1):
        """(train_loader, valid_loader, TextInfo); windows are cut in the main process (`workers` is not used)."""
        from fracfx.data.text import build_text_loaders

        return build_text_loaders(
            name, corpus=self._corpus(name, datadir, train_subset, test_subset), batch_size=batch_size, context=self.context,
            seed=seed, eval_split="valid", eval_batch_size=test_batch_size or max(batch_size, 256), rank=rank, world_size=world_size,
        )

    def dataset_info(self) -> dict[str, Any]:
        c = self.config
        return self.build_loaders(c.dataset, datadir=c.datadir, batch_size=c.batch_size, seed=c.seed,
                                  train_subset=c.train_subset, test_subset=c.test_subset)[2].to_dict()

    def float_model(self, info: dict[str, Any]) -> nn.Module:
        from fracfx.models import build_model

        c = self.config
        sizes = {name: getattr(c, name) for name in SIZE_FIELDS if getattr(c, name) is not None}
        sizes["context"] = int(info["context"])
        return build_model(c.arch, num_classes=int(info["vocab_size"]), **sizes)

    def example_input(self, info: dict[str, Any], batch: int) -> torch.Tensor:
        """`batch` sequences of `context` token ids: MACs per sample are per sequence."""
        return torch.zeros(batch, int(info["context"]), dtype=torch.int64)

    def add_metrics(self, record: dict[str, Any]) -> None:
        record["train_ppl"] = perplexity(record["train_loss"])
        record["test_ppl"] = perplexity(record["test_loss"])

    def score_text(self, record: dict[str, Any]) -> str:
        return f"train ppl {record['train_ppl']:.3f}  valid ppl {record['test_ppl']:.3f}"

    def live_score(self, loss: float, train_acc: float, last: dict[str, Any] | None) -> str:
        return f"ppl {math.exp(min(loss, 700)):.3f}" + ("" if last is None else f"  valid ppl {last['test_ppl']:.3f}")

    def score_row(self, record: dict[str, Any]) -> tuple[str, str]:
        return "validation perplexity at the last evaluation", f"{record['test_ppl']:.3f}"

    def summary_fields(self, metrics: list[dict[str, Any]]) -> dict[str, Any]:
        """Validation perplexity, exp(mean token NLL)."""
        if not metrics:
            return {}
        last = metrics[-1]
        return {"final_test_ppl": last["test_ppl"], "best_test_ppl": min(m["test_ppl"] for m in metrics), "final_train_ppl": last["train_ppl"]}

    def summary_rows(self, summary: dict[str, Any]) -> list[tuple[str, str]]:
        if "final_test_ppl" not in summary:  # no evaluation ran
            return ImageTask.summary_rows(self, summary)
        return [("final validation perplexity", f"{summary['final_test_ppl']:.3f}"), ("best validation perplexity", f"{summary['best_test_ppl']:.3f}")]


def perplexity(mean_nll: float) -> float:
    """exp(mean token negative log-likelihood, in nats); inf past float range, nan for a diverged (nan) loss."""
    try:
        return math.exp(mean_nll)  # exp(nan) is nan
    except OverflowError:
        return math.inf
