"""Session: the live objects of one run and its training step and evaluation.

The session builds the data loaders (from the task), the plan, the method's Recipe, the
optimizer and the LR schedule; step() is one training iteration, evaluate_and_checkpoint() one
evaluation with its metrics line and checkpoint. `ranks` (a RankContext, data-parallel runs) or
None: distributed, `train_model` is the DDP wrapper (forward and backward go through it) and
`model` the module inside it (evaluation, checkpoints); each rank holds its share of every
batch and of the test set.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fracfx.train import checkpointing, data_parallel
from fracfx.train.config import TrainConfig, plan_run
from fracfx.train.methods import get_method
from fracfx.train.metrics import evaluate, evaluate_sums, fresh_window, loss_and_accuracy, metrics_record
from fracfx.train.recipe import BuildContext
from fracfx.train.run_folder import TIMING_KEY, RunFolder
from fracfx.train.tasks import predictions, task_for


class Session:
    def __init__(self, config: TrainConfig, run_dir: Path, ranks=None):
        self.config, self.ranks = config, ranks
        self.is_main = ranks is None or ranks.is_main
        self.folder = RunFolder(run_dir, writes=self.is_main)
        self.device = torch.device(config.device) if ranks is None else ranks.device
        checkpointing.seed_everything(config.seed)
        rank, world = (0, 1) if ranks is None else (ranks.rank, ranks.world_size)
        self.task = task_for(config)
        self.train_loader, self.test_loader, self.info = self.task.build_loaders(
            config.dataset, datadir=config.datadir, batch_size=config.batch_size, test_batch_size=config.test_batch_size,
            workers=config.workers, seed=config.seed, download=config.download,
            train_subset=config.train_subset, test_subset=config.test_subset, rank=rank, world_size=world,
        )
        self.plan = plan_run(config, self.train_loader.batch_sampler.batches_per_epoch)
        info = self.info.to_dict()
        self.method = get_method(config.method)
        self.recipe = self.method().build(self.task.float_model(info), self.task.example_input(info, 2), BuildContext(config, self.plan, ranks))
        self.model = self.recipe.model.to(self.device)
        self.model.train()
        self.train_model = self.model if ranks is None else data_parallel.wrap(self.model, ranks, config)
        if config.optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=list(self.plan.lr_milestones), gamma=config.lr_gamma)
        self.iteration, self.metrics, self.window = 0, [], fresh_window()
        self.checkpoint_iteration: int | None = None
        self._elapsed_before, self._started = 0.0, time.perf_counter()

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    @property
    def finished(self) -> bool:
        return self.iteration >= self.plan.iterations

    @property
    def train_acc(self) -> float:
        return 100.0 * self.window["correct"] / max(self.window["samples"], 1)

    def elapsed(self) -> float:
        return self._elapsed_before + (time.perf_counter() - self._started)

    def start(self) -> None:
        """A fresh run: its config.json."""
        self.folder.start(self.config, self.plan, self.info.to_dict(), self.method.help)

    def resumed(self, iteration: int, metrics: list[dict], window: dict, elapsed: float) -> None:
        """The loop's own state back from a checkpoint (fracfx.train.checkpointing.restore)."""
        self.iteration, self.metrics, self.window = iteration, metrics, window
        self.checkpoint_iteration = iteration
        self._elapsed_before, self._started = elapsed, time.perf_counter()
        self.folder.rewrite_metrics(self.metrics)

    def step(self, index: int, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """One training iteration; returns its cross-entropy (data-parallel: over this rank's share)."""
        if index != self.iteration:
            raise RuntimeError(f"data stream at iteration {index}, training at {self.iteration}")
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        logits, labels = predictions(self.train_model(inputs), targets)
        ce = F.cross_entropy(logits, labels)
        share = global_batch = None
        if self.ranks is not None:
            # DDP averages gradients over ranks: weighting each rank's mean by its share of the
            # global batch (times the world size) makes that average the global batch's gradient.
            global_batch = self.train_loader.batch_sampler.global_batch_size(index % self.plan.batches_per_epoch)
            share = len(targets) / global_batch
        loss = self.recipe.loss(ce if share is None else ce * (share * self.ranks.world_size))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.lr_schedule.step()
        self.recipe.meter.step(len(targets) if global_batch is None else global_batch)  # at the bits in force during this step
        ce_value = float(ce.detach())
        self.recipe.step(ce_value if share is None else ce_value * share)  # a switch decided here applies from the next step
        self.iteration += 1
        self.window["loss"] += ce_value * len(labels)
        self.window["correct"] += int((logits.detach().argmax(1) == labels).sum())
        self.window["samples"] += len(labels)
        self.window["steps"] += 1
        # the loss curve between evaluations: mean CE over every eval_every / 10 iterations (this
        # rank's share in a data-parallel run), written as the metrics line's loss_trace
        pending = self.window.setdefault("trace_pending", [0.0, 0])
        pending[0] += ce_value
        pending[1] += 1
        if self.iteration % max(1, self.plan.eval_every // 10) == 0:
            self._flush_trace()
        return ce_value

    def _flush_trace(self) -> None:
        pending = self.window.get("trace_pending")
        if pending and pending[1]:
            self.window.setdefault("trace", []).append([self.iteration, round(pending[0] / pending[1], 6)])
            self.window["trace_pending"] = [0.0, 0]

    def _evaluate(self) -> tuple[float, float, dict]:
        """(test loss, test accuracy, training window): over all ranks in a data-parallel run."""
        if self.ranks is None:
            return (*evaluate(self.model, self.test_loader, self.device), self.window)
        self.ranks.broadcast_buffers(self.model)  # evaluate every shard with rank 0's running statistics
        w = self.window
        total = self.ranks.sum([*evaluate_sums(self.model, self.test_loader, self.device), w["loss"], w["correct"], w["samples"]])
        for fold in self.recipe.synchronize:
            fold()
        window = dict(w, loss=total[3], correct=round(total[4]), samples=round(total[5]))
        return (*loss_and_accuracy(total[0], round(total[1]), round(total[2])), window)

    def evaluate_and_checkpoint(self) -> dict:
        """Evaluate, append the metrics record, checkpoint (atomically), then write the metrics line."""
        from fracfx.runtime.checkpoint import save_checkpoint

        self._flush_trace()
        test_loss, test_acc, window = self._evaluate()
        record = metrics_record(self.iteration, self.plan, window, test_loss, test_acc, self.lr_schedule.get_last_lr()[0],
                                self.recipe.status(), self.recipe.meter.summary())
        record["loss_trace"] = list(self.window.get("trace", []))  # [iteration, mean training loss] since the last evaluation
        self.task.add_metrics(record)  # language models: train_ppl, test_ppl
        record[TIMING_KEY] = {"elapsed_s": round(self.elapsed(), 3), "unix_time": round(time.time(), 3)}
        self.metrics.append(record)
        self.window = fresh_window()
        for hook in self.recipe.after_evaluate:
            hook()
        rank_states = None if self.ranks is None else data_parallel.rank_states(self)
        self.checkpoint_iteration = self.iteration
        if self.is_main:
            save_checkpoint(self.folder.checkpoint, checkpointing.payload(self, rank_states))
            # After the checkpoint: a crash in between is repaired by restore(), which rewrites
            # metrics.jsonl from the checkpoint's own list.
            self.folder.append_metrics(record)
        return record
