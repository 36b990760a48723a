"""What a run measures: evaluation on the test set, the training window, metrics lines, the summary."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fracfx.train.recipe import MethodStatus
from fracfx.train.tasks import predictions

COST_KEYS = ("effective_macs", "fp32_effective_macs", "sbm_effective_macs", "ratio_vs_fp32", "ratio_vs_sbm")


def evaluate(model: nn.Module, loader, device: torch.device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in %) over the loader, in eval mode."""
    return loss_and_accuracy(*evaluate_sums(model, loader, device))


@torch.no_grad()
def evaluate_sums(model: nn.Module, loader, device: torch.device) -> tuple[float, int, int]:
    """(summed cross-entropy, correct predictions, samples) over the loader, in eval mode."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        outputs, targets = predictions(model(inputs), targets)
        total_loss += float(F.cross_entropy(outputs, targets, reduction="sum"))
        correct += int((outputs.argmax(1) == targets).sum())
        count += len(targets)
    model.train(was_training)
    return total_loss, correct, count


def loss_and_accuracy(total_loss: float, correct: int, count: int) -> tuple[float, float]:
    return total_loss / max(count, 1), 100.0 * correct / max(count, 1)


def fresh_window() -> dict[str, float | int]:
    """Training loss, correct predictions, samples and steps since the last evaluation."""
    return {"loss": 0.0, "correct": 0, "samples": 0, "steps": 0}


def metrics_record(iteration: int, plan, window: dict, test_loss: float, test_acc: float, lr: float,
                   status: MethodStatus, cost: dict) -> dict[str, Any]:
    """One metrics.jsonl line (the task adds its own entries, the session the timing)."""
    samples = max(window["samples"], 1)
    return {
        "iteration": iteration,
        "epoch": iteration / plan.batches_per_epoch,
        "lr": lr,
        "train_loss": window["loss"] / samples,
        "train_acc": 100.0 * window["correct"] / samples,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "stage": status.stage,
        "bits": {"act": status.act, "weight": status.weight, "grad": status.grad},
        "turning_points": list(status.turning_points),
        "method_state": status.extra,
        "effective_macs": cost["effective_macs"],
        "fp32_effective_macs": cost["fp32_effective_macs"],
        "sbm_effective_macs": cost["sbm_effective_macs"],
        "cost_vs_fp32": cost["ratio_vs_fp32"],
        "cost_vs_sbm": cost["ratio_vs_sbm"],
    }


def run_summary(config, plan, metrics: list[dict], cost: dict, elapsed: float, task) -> dict[str, Any]:
    """summary.json: the run's outcome, its cost against FP32 and static 8-bit training."""
    last = metrics[-1] if metrics else {}
    return {
        "method": config.method,
        "arch": config.arch,
        "dataset": config.dataset,
        "iterations": plan.iterations,
        "final_test_acc": last.get("test_acc"),
        "best_test_acc": max((m["test_acc"] for m in metrics), default=None),
        "final_train_loss": last.get("train_loss"),
        "turning_points": last.get("turning_points", []),
        "final_bits": last.get("bits"),
        **{k: cost[k] for k in COST_KEYS},
        "savings_vs_sbm": 1.0 - cost["ratio_vs_sbm"],
        "savings_vs_fp32": 1.0 - cost["ratio_vs_fp32"],
        "elapsed_s": round(elapsed, 1),
        **task.summary_fields(metrics),
        "seed": config.seed,
        # dfq / fractrain: per FracTrain stage, the mean cp against its set-point (percent of FP32)
        **({"stage_cp": last["method_state"]["stage_cp"]} if "stage_cp" in (last.get("method_state") or {}) else {}),
    }
