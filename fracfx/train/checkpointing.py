"""A run's checkpoint: everything a resumed run needs to continue exactly as an uninterrupted one.

The payload holds the model (with quantizer bits, ranges and rounding-generator state), the
optimizer, the LR schedule, the state_dict() of every scheduler and state object of the
method's Recipe (under its name), the cost meter, every RNG, the metrics so far and the open
training window; the data order is a function of (seed, iteration) (see fracfx.data). It holds
plain data and tensors only and is read with weights_only=True (fracfx.runtime.checkpoint).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fracfx.errors import CheckpointError, ConfigError
from fracfx.train.config import RESUME_OVERRIDABLE, TrainConfig, check_same_config, plain
from fracfx.train.recipe import Recipe
from fracfx.train.run_folder import CHECKPOINT, resolve_checkpoint

RUN_KIND = "fracfx-train"


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


def method_state(recipe: Recipe) -> dict[str, Any]:
    return {name: obj.state_dict() for name, obj in recipe.checkpointed().items()}


def load_method_state(recipe: Recipe, state: dict[str, Any]) -> None:
    """Each object's state under its name; refuses a state with other names (another method's)."""
    objects = recipe.checkpointed()
    # DFQ checkpoints written before the Recipe held "scheduler": None (no FracTrain scheduler)
    names = {name for name, value in state.items() if value is not None} if isinstance(state, dict) else None
    if names != set(objects):
        raise ConfigError(f"the checkpoint's method state holds {sorted(names or [])}, this method {sorted(objects)}; "
                          "resume with the method that wrote it")
    for name, obj in objects.items():
        obj.load_state_dict(state[name])


def payload(session, rank_states: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    s = session
    per_epoch = s.plan.batches_per_epoch
    data = {
        "kind": RUN_KIND, "finished": s.finished, "iteration": s.iteration,
        "config": s.config.to_dict(), "plan": dataclasses.asdict(s.plan),
        "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
        "lr_schedule": s.lr_schedule.state_dict(), "method": method_state(s.recipe),
        "cost": s.recipe.meter.state_dict(), "rng": rng_state(),
        "data": {"seed": s.config.seed, "epoch": s.iteration // per_epoch, "batch": s.iteration % per_epoch},
        "metrics": s.metrics, "accumulators": dict(s.window), "elapsed_s": s.elapsed(),
        "dataset": s.info.to_dict(),
    }
    if rank_states is not None:  # data-parallel: each rank's streams, to resume every rank exactly
        data["distributed"] = {"world_size": len(rank_states), "ranks": rank_states}
    return data


def restore(session, state: dict[str, Any]) -> None:
    s = session
    if plain(state["plan"]) != plain(dataclasses.asdict(s.plan)):  # tuples come back from a checkpoint as lists
        raise CheckpointError(
            f"the checkpoint was planned as {state['plan']} but this data gives {dataclasses.asdict(s.plan)}; "
            "resume with the same dataset, subset and batch size"
        )
    saved_world = state.get("distributed", {}).get("world_size", 1)
    world = 1 if s.ranks is None else s.ranks.world_size
    if saved_world != world:
        launch = "plain `fracfx train`" if saved_world == 1 else f"torchrun with {saved_world} processes in total"
        raise CheckpointError(
            f"this checkpoint was written by a run of {saved_world} process(es) but this run has {world}; "
            f"resume it with {launch} (each rank's random streams are part of the checkpoint)"
        )
    s.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    s.lr_schedule.load_state_dict(state["lr_schedule"])
    load_method_state(s.recipe, state["method"])
    s.recipe.meter.load_state_dict(state["cost"])
    set_rng_state(state["rng"])
    if s.ranks is not None:
        from fracfx.runtime.distributed import set_rounding_state

        mine = state["distributed"]["ranks"][s.ranks.rank]
        set_rng_state(mine["rng"])
        set_rounding_state(s.model, mine["rounding"])
    s.resumed(int(state["iteration"]), list(state["metrics"]), dict(state["accumulators"]), float(state.get("elapsed_s", 0.0)))


def read_run_checkpoint(path: Path) -> dict[str, Any]:
    from fracfx.runtime.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    if state.get("kind") != RUN_KIND:
        raise CheckpointError(f"{path} is a fracfx checkpoint but not of a training run (kind {state.get('kind')!r})")
    return state


def open_run(config: TrainConfig | None, resume, *, restart_count: int = 0, console=None) -> tuple[TrainConfig, Path, dict | None]:
    """(config, run directory, checkpoint payload or None) for a fresh or a resumed run.

    restart_count > 0 (torchrun restarted the workers): a fresh run's folder that already holds
    a checkpoint is resumed from it, as the restarted job's command line is the first one.
    """
    if resume is None:
        if config is None:
            raise ConfigError("train() needs a TrainConfig (or resume=RUN_DIR)")
        run_dir = Path(config.save_folder)
        if (run_dir / CHECKPOINT).exists():
            if not restart_count:
                raise ConfigError(f"{run_dir} already holds a run; resume it with --resume {run_dir}, or choose another --save-folder")
            if console is not None:
                console.print(f"torchrun restart {restart_count}: resuming {run_dir} from its last checkpoint")
            resume = run_dir
        else:
            return config, run_dir, None
    path = resolve_checkpoint(resume)
    state = read_run_checkpoint(path)
    saved = TrainConfig.from_dict(state["config"])
    if config is not None:
        check_same_config(saved, config)
        defaults = TrainConfig(method=config.method)
        saved = saved.replace(**{k: getattr(config, k) for k in RESUME_OVERRIDABLE if getattr(config, k) != getattr(defaults, k)})
    return saved, path.parent, state

