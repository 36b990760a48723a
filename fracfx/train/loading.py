"""Trained models back from checkpoints (`fracfx export`, `fracfx inspect`, test-set accuracy)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fracfx.errors import CheckpointError, ConfigError
from fracfx.train.checkpointing import load_method_state, read_run_checkpoint
from fracfx.train.config import Plan, TrainConfig
from fracfx.train.methods import get_method
from fracfx.train.recipe import BuildContext, Recipe
from fracfx.train.run_folder import resolve_checkpoint, saved_dataset
from fracfx.train.tasks import task_for


@dataclasses.dataclass
class TrainedCheckpoint:
    """A training checkpoint rebuilt: config, plan, dataset info, the method's recipe (state loaded) and its model."""

    path: Path
    config: TrainConfig
    plan: Plan
    dataset: dict[str, Any]
    recipe: Recipe
    model: nn.Module
    example_input: torch.Tensor
    state: dict[str, Any]


def load_trained(path: str | os.PathLike) -> TrainedCheckpoint:
    """Rebuild the model of a `fracfx train` checkpoint (a run directory or its checkpoint.pt).

    The model is rebuilt the way the run built it (the method's recipe on the float model of
    the stored config), then the checkpoint's weights, quantizer state and method state (DFQ
    controller, FracTrain scheduler) are loaded; the file is read with weights_only=True
    (runtime/checkpoint.py). The model is returned in eval mode. Global RNG state is untouched.
    """
    path = resolve_checkpoint(path)
    state = read_run_checkpoint(path)
    config = TrainConfig.from_dict(state["config"])
    plan = Plan.from_dict(state["plan"])
    task = task_for(config)
    info = saved_dataset(state, path) or task.dataset_info()
    with torch.random.fork_rng(devices=[]):  # building draws initial weights; they are overwritten below
        recipe = get_method(config.method)().build(task.float_model(info), task.example_input(info, 2), BuildContext(config, plan))
    try:
        recipe.model.load_state_dict(state["model"])
        load_method_state(recipe, state["method"])
    except (RuntimeError, KeyError, ConfigError) as error:
        raise CheckpointError(f"{path} does not fit the model its config builds ({type(error).__name__}: {error})") from error
    recipe.model.eval()
    return TrainedCheckpoint(path, config, plan, info, recipe, recipe.model, task.example_input(info, 1), state)


def model_from_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, torch.Tensor]:
    """(fixed-precision GraphModule, example input) of a training checkpoint, for fracfx export."""
    loaded = load_trained(path)
    return fixed_precision_model(loaded), loaded.example_input


def fixed_precision_model(loaded: TrainedCheckpoint) -> nn.Module:
    """The GraphModule `fracfx export` writes for a loaded checkpoint, in eval mode.

    Quantized runs give their transformed model at the bits in force at the checkpoint; DFQ and
    FracTrain runs give it with every gated block pinned at its most used candidate (see
    fracfx.train.methods.dfq); an FP32 run gives its float model traced with 0-bit (FP32) quantizers.
    """
    from torch import fx

    gm = loaded.recipe.fixed_precision_model()
    if not isinstance(gm, fx.GraphModule):
        from fracfx.train.methods.shared import fp32_graph

        gm = fp32_graph(gm, loaded.example_input)
    return gm.eval()
