"""Training cost of a DFQ / FracTrain run, counted per sample at the candidate it used.

CostMeter (runtime/cost.py) prices a step at one bits assignment; under DFQ every sample picks
its own candidate in every gated block, so DFQCostMeter prices what each sample actually ran.
Per iteration on B samples (docs/method.md section 5, effective MACs = bit-ops / 1024):

    gated   = sum_b sum_k n_bk * sum_{o in b} M_o * (a_k*w_o + g_k*w_o + a_k*g_k) / 1024
    ungated = B * sum_{o not gated} M_o * (a_o*w_o + g_o*w_o + a_o*g_o) / 1024   (static bits;
              FP32 ops count a = w = g = 32)
    effective MACs = gated + ungated

n_bk is how many of the B samples chose candidate k in block b, read from the gates' masks of
the step just taken (DFQController.blocks[b].choice.last_mask); the per-candidate bit-ops are
the controller's own (`_Block.units()`: "skip" costs 0, "fp32" 3 * 32 * 32 per MAC). The
baselines are fracfx.cost_model's, as in CostMeter: FP32 training 3 * M and static 8-bit
3 * M * 64 / 1024 per sample, M the MACs of every compute op.

The gate network itself (embeddings, the shared LSTM cell, the head; FP32, trained) is not part
of the paper's metric; it is counted separately as `gate_effective_macs` (3 * its MACs per
sample) and `ratio_vs_sbm_with_gate` adds it, so a report can show both.

    meter = DFQCostMeter(qm, controller)
    loss = ce + controller.cost_loss(); loss.backward(); opt.step()
    meter.step(len(y))          # reads this step's masks
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fracfx.cost_model import FP32_BITOPS, fp32_effective_macs, op_bits, priced_ops, ratio, sbm_effective_macs, step_bitops
from fracfx.runtime.cost import Meter, check_batch_size
from fracfx.errors import ConfigError
from fracfx.meta import GATE_EMBED, GATE_HEAD, GATE_STEP, get_binding, get_block, get_inserted
from fracfx.nn.gates import choice_of
from fracfx.runtime.dfq import DFQController
from fracfx.runtime.plateau import STATE_VERSION, check_state

GATE_MODULE_ROLES = (GATE_EMBED, GATE_STEP, GATE_HEAD)  # the gate's modules that compute (MACs)


def _module_macs(module: nn.Module) -> int:
    """MACs per call of one gate module on one sample (pooled inputs: 1x1 convs act on one position)."""
    if isinstance(module, nn.LSTMCell):
        return 4 * module.hidden_size * (module.input_size + module.hidden_size)
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
        return module.in_channels // module.groups * module.out_channels
    return sum(_module_macs(child) for child in module.children())


def gate_macs_per_sample(gm: fx.GraphModule) -> int:
    """MACs of one sample through the gate network (every gated block's embedding, LSTM step and head)."""
    total = 0
    for node in gm.graph.nodes:
        inserted = get_inserted(node)
        if inserted is not None and inserted.role in GATE_MODULE_ROLES and node.op == "call_module":
            total += _module_macs(gm.get_submodule(node.target))
    return total


class DFQCostMeter(Meter):
    """Accumulates the effective MACs of DFQ training from the candidates each sample used."""

    def __init__(self, gm: fx.GraphModule, controller: DFQController):
        if not isinstance(controller, DFQController):
            raise ConfigError("DFQCostMeter reads a fracfx.runtime.DFQController; pass the one that drives this model")
        self.gm, self.controller = gm, controller
        self.macs_per_sample = 0
        self.ungated_per_sample = 0.0
        gated = 0
        for node, _, macs in priced_ops(gm):
            self.macs_per_sample += macs
            if get_block(node) is not None and get_binding(node) is not None:
                gated += macs
                continue
            self.ungated_per_sample += macs * step_bitops(*op_bits(gm, node)) / FP32_BITOPS
        if gated != controller.total_macs:
            raise ConfigError(f"the controller gates {controller.total_macs} MACs per sample but this model's gated ops hold {gated}; pass the model the controller was built on")
        self.gate_per_sample = fp32_effective_macs(gate_macs_per_sample(gm))
        self.fp32_per_sample = fp32_effective_macs(self.macs_per_sample)
        self.sbm_per_sample = sbm_effective_macs(self.macs_per_sample)
        self.iterations = 0
        self.samples = 0
        self.gated_effective_macs = 0.0
        self.ungated_effective_macs = 0.0

    def counts(self, batch_size: int) -> list[list[int]]:
        """Per gated block, how many samples of the last forward chose each candidate.

        A controller with `reduce` (data-parallel) gives the global batch's counts; batch_size
        is then the global batch size.
        """
        if self.controller.reduce is not None:
            counts = self.controller.last_counts
            if counts is None or any(sum(row) != batch_size for row in counts):
                raise ConfigError(
                    f"the controller's last global batch had {None if counts is None else sum(counts[0])} samples, not {batch_size}; "
                    "call controller.cost_loss() in the training step and step() right after it with the global batch size"
                )
            return counts
        counts = []
        for block in self.controller.blocks:
            mask = block.choice.last_mask
            if mask is None:
                raise ConfigError("no forward has run yet: DFQCostMeter.step() prices the step just taken")
            if mask.shape[0] != batch_size:
                raise ConfigError(
                    f"block {block.name}'s last forward had {mask.shape[0]} samples, not {batch_size}; "
                    "call step() right after the training step (before any other forward)"
                )
            counts.append(torch.bincount(choice_of(mask), minlength=mask.shape[1]).tolist())
        return counts

    def step(self, batch_size: int) -> float:
        """Account the training step just taken on `batch_size` samples; returns its effective MACs."""
        check_batch_size(batch_size)
        bitops = 0.0
        for block, counts in zip(self.controller.blocks, self.counts(batch_size)):
            bitops += sum(n * unit for n, unit in zip(counts, block.units()) if n)
        gated = bitops / FP32_BITOPS
        ungated = self.ungated_per_sample * batch_size
        self._advance(batch_size)
        self.gated_effective_macs += gated
        self.ungated_effective_macs += ungated
        return gated + ungated

    @property
    def effective_macs(self) -> float:
        return self.gated_effective_macs + self.ungated_effective_macs

    @property
    def gate_effective_macs(self) -> float:
        return self.gate_per_sample * self.samples

    def summary(self) -> dict[str, float | int]:
        return {
            **super().summary(),
            "gated_effective_macs": self.gated_effective_macs,
            "ungated_effective_macs": self.ungated_effective_macs,
            "gate_effective_macs": self.gate_effective_macs,
            "ratio_vs_sbm_with_gate": ratio(self.effective_macs + self.gate_effective_macs, self.sbm_effective_macs),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "kind": "dfq_cost_meter", "macs_per_sample": self.macs_per_sample,
            "blocks": [b.name for b in self.controller.blocks], "iterations": self.iterations, "samples": self.samples,
            "gated_effective_macs": self.gated_effective_macs, "ungated_effective_macs": self.ungated_effective_macs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state, "dfq_cost_meter", "DFQCostMeter")
        blocks = [b.name for b in self.controller.blocks]
        if state.get("macs_per_sample") != self.macs_per_sample or state.get("blocks") != blocks:
            raise ConfigError(
                f"DFQCostMeter state was recorded on a model with {state.get('macs_per_sample')} MACs per sample and blocks "
                f"{state.get('blocks')}; this one has {self.macs_per_sample} and {blocks}: resume with the same model"
            )
        try:
            iterations, samples = int(state["iterations"]), int(state["samples"])
            gated, ungated = float(state["gated_effective_macs"]), float(state["ungated_effective_macs"])
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"DFQCostMeter state is incomplete or malformed ({error!r}); pass what state_dict() returned") from error
        self.iterations, self.samples = iterations, samples
        self.gated_effective_macs, self.ungated_effective_macs = gated, ungated
