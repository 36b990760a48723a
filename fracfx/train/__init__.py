"""Training: one loop for every method (fp32, static, pfq, dfq, fractrain), resumable exactly.

    from fracfx.train import TrainConfig, train
    result = train(TrainConfig(method="pfq", arch="cifar_resnet20", epochs=1, save_folder="runs/pfq"))

Where things are:
    config.py         TrainConfig (run fields + the method's options), Plan
    methods/          one module per method; each builds a Recipe; the registry (METHOD_MODULES)
    recipe.py         Recipe: the model, cost meter, loss terms and schedulers a method hands the loop
    loop.py           train(): the loop; session.py: the step and the evaluation
    checkpointing.py  checkpoint payload and restore, resuming; run_folder.py: the run's files
    data_parallel.py  torchrun process group, DDP, per-rank streams
    tasks.py          ImageTask, LanguageModelTask; metrics.py, display.py: what is measured and shown
    loading.py        trained models back from checkpoints; report.py: plots and tables of runs
"""

from fracfx.train.config import Option, Plan, TrainConfig, plan_run
from fracfx.train.loading import TrainedCheckpoint, fixed_precision_model, load_trained, model_from_checkpoint
from fracfx.train.loop import TrainResult, train
from fracfx.train.methods import Method, available_methods, get_method, register_method
from fracfx.train.metrics import evaluate
from fracfx.train.recipe import BuildContext, MethodStatus, Recipe
from fracfx.train.run_folder import CHECKPOINT, CONFIG, TIMING_KEY, read_metrics, resolve_checkpoint
from fracfx.train.session import Session
from fracfx.train.tasks import task_for


__all__ = [
    "TrainConfig", "Plan", "plan_run", "Option", "train", "TrainResult", "load_trained", "model_from_checkpoint",
    "fixed_precision_model", "TrainedCheckpoint", "read_metrics", "resolve_checkpoint", "available_methods", "get_method",
    "register_method", "Method", "Recipe", "MethodStatus", "BuildContext", "Session", "evaluate", "task_for",
    "CHECKPOINT", "CONFIG", "TIMING_KEY",
]
