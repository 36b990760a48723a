"""DFQ's cost term and FracTrain's moving target (docs/method.md sections 3 and 4).

For the last forward, with B the actual batch size, m_b (B, K) block b's mask and, for each
quantized op o in block b, M_o its MACs per sample (meta.OpCost) and w_o its weight bits:

    C      = sum_b sum_i sum_k m_b[i, k] * sum_{o in b} M_o * (a_k*w_o + g_k*w_o + a_k*g_k)
    cp     = 100 * C / (B * 3 * 32*32 * sum_o M_o)          percent of FP32 training cost
    C_norm = C / (32*32 * mean_b M_b)                       M_b = sum_{o in b} M_o
    loss   = r * beta * C_norm,  r = +1 if cp >= target, -1 below (in a relax band: +-band_sign)

error_gain (fracfx; 0, the paper's rule, by default) scales r by the cp error:
    r <- r * (1 + error_gain * |cp - target|)          (cp and target in percent of FP32)
so that far from the set-point (after FracTrain raised it) the gates move error_gain * error
times faster, and near it the term is the paper's. Measured on the Fashion-MNIST sweep
(README, results:fmnist) it does not follow a raised set-point in real training: FracTrain's
first set-point (1.5 %) lies below the cheapest candidate (~2 %), so for the whole first stage
the gain multiplies the push towards the cheapest candidate (x11 at G = 20), the gate softmax
saturates there, and later the push up has no gradient to act on.
raise_gain (fracfx; 0 by default) scales r only below the set-point, where the gates must raise
their precision:
    r <- r * (1 + raise_gain * |cp - target|)   if cp < target
so an unreachable low set-point pushes with the paper's strength and a raised one pulls harder.
Both rules are stateless: a checkpoint holds only the settings, and resume stays exact.

C_norm is the reference's normalisation (per-sample sums, block MACs over their mean), so the
paper's beta = 1e-3 keeps its strength. Only gated ops enter C and cp (as in the paper and its
cost table: the gate cannot change the rest); the whole-model cost belongs to the cost meter.

    dfq = fracfx.runtime.DFQController(qm, target_ratio=3.0)
    loss = criterion(qm(x), y) + dfq.cost_loss(); loss.backward()
    frac = fracfx.runtime.FracTrainScheduler(dfq, target_ratio_step=0.5, window=400)
    frac.step(loss)   # after each iteration: a plateau raises the target by one step
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.fx as fx

from fracfx.bits import cost_bits
from fracfx.config import FP32_CANDIDATE, SKIP
from fracfx.errors import ConfigError
from fracfx.nn.gates import FP32_BITOPS, GateChoice, choice_of
from fracfx.meta import get_binding, get_block, get_inserted, get_op_cost
from fracfx.runtime.plateau import STATE_VERSION, PlateauIndicator, PlateauTracker, check_state


class _Block:
    def __init__(self, name: str, choice: GateChoice, ops: list[tuple[int, Any]]):
        self.name, self.choice, self.ops = name, choice, ops  # ops: (MACs per sample, weight quantizer or None)

    @property
    def macs(self) -> int:
        return sum(macs for macs, _ in self.ops)

    def units(self) -> list[float]:
        """Per candidate: bit-ops of one sample through this block, at the weight bits in force."""
        table = self.choice.table
        return [float(sum(macs * table.bitops(k, None if w is None else w.current_bits) for macs, w in self.ops)) for k in range(len(table))]

    def bit_sums(self) -> list[tuple[float, float, float]]:
        """Per candidate: sum over the block's ops of MACs * (a, w, g) bits, as the cost model counts them."""
        table, sums = self.choice.table, []
        for entry in table.entries:
            a_sum = w_sum = g_sum = 0.0
            for macs, weight in self.ops:
                if entry == SKIP:
                    a, w, g = 0, 0, 0
                elif entry == FP32_CANDIDATE:
                    a = w = g = 32
                else:
                    a, g = cost_bits(entry[0]), cost_bits(entry[1])
                    w = a if weight is None else cost_bits(weight.current_bits)
                a_sum, w_sum, g_sum = a_sum + macs * a, w_sum + macs * w, g_sum + macs * g
            sums.append((a_sum, w_sum, g_sum))
        return sums


def _find_blocks(gm: fx.GraphModule) -> list[_Block]:
    ops: dict[int, list] = {}
    for node in gm.graph.nodes:
        spec, binding = get_block(node), get_binding(node)
        if spec is None or binding is None:
            continue
        cost = get_op_cost(node)
        if cost is None:
            raise ConfigError("the DFQ cost needs MACs per op: pass example_inputs to fracfx.transform(model, DFQConfig(...), example_inputs=...)")
        weight = gm.get_submodule(binding.weight) if binding.weight is not None else None
        ops.setdefault(spec.index, []).append((cost.macs_per_sample, weight))
    blocks, names = [], set()
    for node in gm.graph.nodes:
        inserted = get_inserted(node)
        if inserted is None or inserted.role != "gate_choice":
            continue
        spec = get_block(node)
        name = spec.module_path if spec.module_path not in names else f"{spec.module_path}#{spec.index}"
        names.add(name)
        blocks.append(_Block(name, gm.get_submodule(node.target), ops.get(spec.index, [])))
    return blocks


def _finite(value, what: str, minimum: float = -math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{what} must be a finite number >= {minimum}, got {value!r}")
    return float(value)


GAINS = ("error_gain", "raise_gain")  # fracfx's tracking options; 0 keeps the paper's rule


class DFQController:
    """The cost term of DFQ training, the cp it steers, and per-block candidate usage."""

    def __init__(self, gm: fx.GraphModule, *, target_ratio: float, beta: float = 1e-3, relax: float = 0.0, band_sign: float = 0.0,
                 reduce=None, error_gain: float = 0.0, raise_gain: float = 0.0):
        if not isinstance(gm, fx.GraphModule):
            raise ConfigError("DFQController needs the GraphModule returned by fracfx.transform(model, fracfx.DFQConfig(...), example_inputs=...)")
        self.blocks = _find_blocks(gm)
        if not self.blocks:
            raise ConfigError("this model has no DFQ gates; transform it with fracfx.DFQConfig(...) first")
        if not any(block.ops for block in self.blocks):
            raise ConfigError("no gated block holds a quantized op, so DFQ has no cost to steer")
        self.target_ratio = _finite(target_ratio, "target_ratio (percent of FP32 cost, e.g. 3.0)", 0.0)
        self.beta = _finite(beta, "beta", 0.0)
        self.relax = _finite(relax, "relax (width of the band around target_ratio, in cp percent)", 0.0)
        self.band_sign = _finite(band_sign, "band_sign (r inside the relax band, e.g. 0 or 0.1)", 0.0)
        self.error_gain = _finite(error_gain, "error_gain (r scales by 1 + error_gain * |cp - target|; 0 = the paper's rule)", 0.0)
        self.raise_gain = _finite(raise_gain, "raise_gain (below the target r scales by 1 + raise_gain * |cp - target|; 0 = the paper's rule)", 0.0)
        self.labels = self.blocks[0].choice.table.labels
        self.usage_counts: dict[str, list[int]] = {b.name: [0] * len(self.labels) for b in self.blocks}
        self.last_cp: float | None = None
        self._recorded = -1
        if reduce is not None and not (callable(getattr(reduce, "sum", None)) and isinstance(getattr(reduce, "world_size", None), int)):
            raise ConfigError("reduce must have world_size and sum(values) -> list[float] (a fracfx.runtime.distributed.RankContext), or be None")
        self.reduce = reduce
        self.last_counts: list[list[int]] | None = None  # with reduce: per block, the global batch's choices

    @property
    def total_macs(self) -> int:
        """MACs per sample of all gated ops."""
        return sum(b.macs for b in self.blocks)

    def _masks(self) -> list[torch.Tensor]:
        masks = [b.choice.last_mask for b in self.blocks]
        if any(m is None for m in masks):
            raise ConfigError("no forward has run yet: call the model on a batch before cost_loss()/cp")
        return masks

    def _cost(self) -> torch.Tensor:
        """C of the last forward (differentiable through the masks)."""
        total = None
        for block, mask in zip(self.blocks, self._masks()):
            units = torch.tensor(block.units(), dtype=mask.dtype, device=mask.device)
            term = (mask * units).sum()
            total = term if total is None else total + term
        return total

    def observe(self) -> float:
        """cp of the last forward; adds its choices to the usage counts (once per forward).

        With `reduce` (data-parallel runs), cp and the counts are those of the global batch:
        C, the batch size and the per-block choices are summed over ranks in one all_reduce,
        once per forward (a second call for the same forward returns the cached cp).
        """
        if self.reduce is not None:
            return self._observe_global()
        masks = self._masks()
        batch = masks[0].shape[0]
        with torch.no_grad():
            cp = 100.0 * float(self._cost()) / (batch * 3 * FP32_BITOPS * self.total_macs)
        forward = self.blocks[0].choice.forward_count
        if forward != self._recorded:
            self._recorded = forward
            for block, mask in zip(self.blocks, masks):
                counts = torch.bincount(choice_of(mask), minlength=len(self.labels)).tolist()
                self.usage_counts[block.name] = [a + b for a, b in zip(self.usage_counts[block.name], counts)]
        self.last_cp = cp
        return cp

    def _observe_global(self) -> float:
        masks = self._masks()
        forward = self.blocks[0].choice.forward_count
        if forward == self._recorded:
            return self.last_cp
        with torch.no_grad():
            local = [float(self._cost()), float(masks[0].shape[0])]
        k = len(self.labels)
        for mask in masks:
            local += torch.bincount(choice_of(mask), minlength=k).tolist()
        total = self.reduce.sum(local)
        cost, batch = total[0], total[1]
        counts = [[int(round(c)) for c in total[2 + i * k:2 + (i + 1) * k]] for i in range(len(masks))]
        for block, row in zip(self.blocks, counts):
            self.usage_counts[block.name] = [a + b for a, b in zip(self.usage_counts[block.name], row)]
        self._recorded, self.last_counts = forward, counts
        self.last_cp = 100.0 * cost / (batch * 3 * FP32_BITOPS * self.total_macs)
        return self.last_cp

    @property
    def cp(self) -> float:
        """Percent of FP32 training cost of the gated ops in the last forward; records nothing.

        The cached value once observe() (or cost_loss()) saw this forward; else computed from
        this process's masks (data-parallel: call observe() for the global batch's cp).
        """
        if self.blocks[0].choice.forward_count == self._recorded:
            return self.last_cp
        masks = self._masks()
        with torch.no_grad():
            return 100.0 * float(self._cost()) / (masks[0].shape[0] * 3 * FP32_BITOPS * self.total_macs)

    def sign(self, cp: float) -> float:
        """r: +1 at or above the target, -1 below; +-band_sign inside (target - relax, target + relax)."""
        if self.relax > 0 and self.target_ratio - self.relax <= cp < self.target_ratio + self.relax:
            return self.band_sign if cp >= self.target_ratio else -self.band_sign
        return 1.0 if cp >= self.target_ratio else -1.0

    def cost_loss(self) -> torch.Tensor:
        """r * beta * C_norm for the last forward; add it to the task loss.

        With `reduce`, r follows the global cp and this rank's C is scaled by the world size, so
        that DDP's gradient average equals the gradient of the global batch's cost term.
        """
        cp = self.observe()
        r = self.sign(cp)
        if self.error_gain > 0:
            r = r * (1.0 + self.error_gain * abs(cp - self.target_ratio))
        if self.raise_gain > 0 and cp < self.target_ratio:
            r = r * (1.0 + self.raise_gain * (self.target_ratio - cp))
        mean_block_macs = self.total_macs / len(self.blocks)
        if self.reduce is not None:
            r = r * self.reduce.world_size
        return self._cost() * (r * self.beta / (FP32_BITOPS * mean_block_macs))

    @property
    def usage(self) -> dict[str, dict[str, int]]:
        """Per block, how many samples chose each candidate since the last reset_usage()."""
        return {name: dict(zip(self.labels, counts)) for name, counts in self.usage_counts.items()}

    def reset_usage(self) -> None:
        self.usage_counts = {name: [0] * len(self.labels) for name in self.usage_counts}

    def _settings(self) -> dict[str, Any]:
        settings = {"beta": self.beta, "relax": self.relax, "band_sign": self.band_sign, "labels": list(self.labels), "blocks": [b.name for b in self.blocks]}
        for name in GAINS:  # absent at 0: checkpoints of the paper's rule keep their earlier form
            if getattr(self, name) > 0:
                settings[name] = getattr(self, name)
        return settings

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "kind": "dfq", **self._settings(), "target_ratio": self.target_ratio,
            "last_cp": self.last_cp, "usage": {name: list(c) for name, c in self.usage_counts.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state, "dfq", "DFQController", self._settings())
        for name in GAINS:
            if float(state.get(name, 0.0)) != getattr(self, name):
                raise ConfigError(
                    f"DFQController state was saved with {name}={state.get(name, 0.0)!r} but this one has "
                    f"{name}={getattr(self, name)!r}; construct it with the same settings as the run you resume"
                )
        try:
            target = _finite(state["target_ratio"], "target_ratio", 0.0)
            last = None if state["last_cp"] is None else float(state["last_cp"])
            usage = {name: [int(c) for c in state["usage"][name]] for name in self.usage_counts}
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"DFQController state is incomplete or malformed ({error!r}); pass what state_dict() returned") from error
        self.target_ratio, self.last_cp, self.usage_counts = target, last, usage

    def __repr__(self) -> str:
        gain = "".join(f", {name}={getattr(self, name)}" for name in GAINS if getattr(self, name) > 0)
        return f"DFQController(blocks={len(self.blocks)}, target_ratio={self.target_ratio}, beta={self.beta}{gain}, last_cp={self.last_cp})"


class FracTrainScheduler:
    """FracTrain: the PFQ plateau indicator raises DFQ's target, target_t = target_0 + t * step."""

    def __init__(
        self,
        controller: DFQController,
        *,
        target_ratio_step: float = 0.5,
        window: int = 400,
        num_turning_point: int = 3,
        initial_threshold: float = 0.05,
        decay: float = 0.3,
        decay_turning_points: Iterable[int] = (1, 2),
        reduce=None,
    ):
        if not isinstance(controller, DFQController):
            raise ConfigError("FracTrainScheduler drives a fracfx.runtime.DFQController; pass one")
        self.controller = controller
        self.base_target = controller.target_ratio
        self.target_ratio_step = _finite(target_ratio_step, "target_ratio_step", 0.0)
        indicator = PlateauIndicator(
            num_turning_point=num_turning_point, initial_threshold=initial_threshold,
            decay=decay, decay_turning_points=decay_turning_points,
        )
        self.tracker = PlateauTracker(window=window, indicator=indicator, reduce=reduce)

    @property
    def stage(self) -> int:
        return self.tracker.stage

    @property
    def target_ratio(self) -> float:
        return self.base_target + self.stage * self.target_ratio_step

    def step(self, loss) -> bool:
        """Call once per iteration; True iff the target rose (in force from the next iteration)."""
        switched = self.tracker.step(loss)
        if switched:
            self.controller.target_ratio = self.target_ratio
        return switched

    def _settings(self) -> dict[str, Any]:
        return {"base_target": self.base_target, "target_ratio_step": self.target_ratio_step}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "kind": "fractrain", **self._settings(), "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state, "fractrain", "FracTrainScheduler", self._settings())
        self.tracker.load_state_dict(state["tracker"])
        self.controller.target_ratio = self.target_ratio

    def __repr__(self) -> str:
        return f"FracTrainScheduler(stage={self.stage}, target_ratio={self.target_ratio}, iteration={self.tracker.iteration})"
