"""Data-parallel training on torch.distributed: the process group a run spans and what it reduces.

`fracfx train` run by torchrun (WORLD_SIZE > 1 in the environment) trains with
DistributedDataParallel; this module is everything that knows about ranks:

    launch = launch_environment()            # None when not under torchrun (or a world of 1)
    ranks = start(launch, "cpu")             # gloo on CPU, nccl on CUDA (cuda:LOCAL_RANK)
    ranks.sum([loss_sum, samples])           # one all_reduce (float64) of a few numbers
    stop(ranks)

`RankContext` is explicit, plain state handed to whoever needs it (the trainer, the PFQ
indicator, the DFQ controller): nothing here is a global switch. Every method is a
collective: all ranks must call it, in the same order. They run on the default process group,
interleaved with DDP's gradient buckets in the same order on every rank (the backward graph is
the same everywhere), as torch.nn.SyncBatchNorm's do.

The objects the runtime drives take `reduce=` (a RankContext or anything with `world_size`
and `sum(values) -> list[float]`): the PFQ / FracTrain PlateauTracker sums its per-rank window
losses once per window, the DFQ controller sums its cost and batch size once per forward.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from fracfx.errors import DistributedError

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Substrings of the errors gloo and NCCL raise (as plain RuntimeError) when a peer is gone.
_PEER_FAILURE_MARKERS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "gloo", "NCCL", "timed out")


@dataclasses.dataclass(frozen=True)
class Launch:
    """Where torchrun put this process: rank, world size, local rank (from its environment)."""

    rank: int
    world_size: int
    local_rank: int
    restart_count: int = 0


def launch_environment(env: Mapping[str, str] | None = None) -> Launch | None:
    """The torchrun placement of this process, or None for a single-process run.

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a world of one
    process is a single-process run (exactly the plain `fracfx train`).
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        stray = [name for name in ("RANK", "LOCAL_RANK") if name in env]
        if stray:
            raise DistributedError(f"{', '.join(stray)} is set but WORLD_SIZE is not; launch with torchrun, or unset {stray[0]}")
        return None
    values = {}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        text = env.get(name, "0" if name == "LOCAL_RANK" else None)
        if text is None or not text.strip().isdigit():
            raise DistributedError(f"{name}={text!r} in the environment is not a rank number; launch with torchrun, which sets {', '.join(_ENV)}")
        values[name] = int(text)
    world, rank = values["WORLD_SIZE"], values["RANK"]
    if world < 1 or rank >= world:
        raise DistributedError(f"RANK={rank} does not fit WORLD_SIZE={world}; launch with torchrun")
    if world == 1:
        return None
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
    if missing:
        raise DistributedError(f"{' and '.join(missing)} not set for a world of {world}; launch with torchrun (it sets them)")
    return Launch(rank, world, values["LOCAL_RANK"], elastic_restart_count(env))


def elastic_restart_count(env: Mapping[str, str] | None = None) -> int:
    """How many times torchrun has restarted this job's workers (0 on the first attempt)."""
    env = os.environ if env is None else env
    text = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    return int(text) if text.strip().isdigit() else 0


def rank_device(device: str, local_rank: int) -> torch.device:
    """The device of one rank: the CPU, or the GPU of its local rank (cuda:LOCAL_RANK)."""
    requested = torch.device(device)
    if requested.type not in BACKENDS:
        raise DistributedError(f"--device {device}: multi-process training runs on cpu (gloo) or cuda (nccl)")
    if requested.type == "cpu":
        return requested
    if requested.index is not None:
        raise DistributedError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda")
    if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
        raise DistributedError(f"rank with LOCAL_RANK={local_rank} needs a GPU but this machine has {torch.cuda.device_count()}; "
                               "use --nproc_per_node <= the GPU count, or --device cpu")
    return torch.device("cuda", local_rank)


@dataclasses.dataclass(frozen=True, eq=False)
class RankContext:
    """One rank of a running process group, and the collectives the runtime needs."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    group: Any = None  # the process group of the collectives (None: the default one)
    restart_count: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder (checkpoints, metrics, summary) and prints."""
        return self.rank == 0

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over all ranks, in float64, with one all_reduce."""
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, group=self.group)
        return tensor.tolist()

    def min_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise minimum over all ranks, in place (returns the tensor)."""
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.group)
        return tensor

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over all ranks, in place (returns the tensor)."""
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.group)
        return out

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (BN running stats, quantizer ranges) to every rank, as DDP does before each forward."""
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0, group=self.group)

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def __deepcopy__(self, memo):  # held by modules (sync BN, quantizer ranges); a process group does not copy
        return self


def start(launch: Launch, device: str, *, timeout_s: float = 1800.0) -> RankContext:
    """Join the process group torchrun set up (env:// rendezvous); gloo on CPU, nccl on CUDA."""
    target = rank_device(device, launch.local_rank)
    backend = BACKENDS[target.type]
    if target.type == "cuda":
        torch.cuda.set_device(target)
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, init_method="env://", rank=launch.rank, world_size=launch.world_size, timeout=timeout)
    except (RuntimeError, ValueError) as error:
        raise DistributedError(
            f"rank {launch.rank} of {launch.world_size} could not join the process group ({type(error).__name__}: {error}); "
            "check that every node runs the same torchrun command with the same --rdzv-endpoint (or --master_addr/--master_port) "
            "and that the port is open"
        ) from error
    # The default group: a second one (dist.new_group) does not survive torchrun's elastic
    # restarts in torch 2.14 (the restarted ranks hang connecting to the old attempt's peers).
    return RankContext(launch.rank, launch.world_size, launch.local_rank, target, backend, None, launch.restart_count)


def stop(ranks: RankContext | None, *, finished: bool = False) -> None:
    """Leave the process group (no-op for a single-process run).

    After a finished run every rank first waits for the others: a rank that tears gloo down
    while a peer is still writing the run's files can abort in gloo's shutdown ("terminate called
    without an active exception"). After a failure there is no barrier (a dead peer never comes).
    """
    if ranks is not None and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def seed_for_rank(seed: int, rank: int) -> int:
    """Rank 0 keeps the run's seed (so its streams are those of a single-process run); others mix in their rank.

    31 bits, like a typical --seed, so derived seeds (fracfx.seed_rounding multiplies) stay in range.
    """
    if rank == 0:
        return seed
    from fracfx.seeding import mix_seed

    return mix_seed(seed, 0xD15, rank) % (1 << 31)


def is_peer_failure(error: BaseException) -> bool:
    """Whether an exception raised by a collective means another rank (or the network) is gone."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in _PEER_FAILURE_MARKERS)


class Terminated(Exception):
    """SIGTERM arrived: torchrun stops the remaining ranks this way when one of them fails."""


def terminated_message(ranks: RankContext, iteration: int, checkpoint_iteration: int | None, run_dir) -> str:
    cause = ("received SIGTERM: torchrun stops every rank when one fails (its report names the rank that failed), "
             "or the job was cancelled")
    return _stopped(ranks, iteration, checkpoint_iteration, run_dir, cause)


def peer_failure_message(ranks: RankContext, iteration: int, checkpoint_iteration: int | None, run_dir, error: BaseException) -> str:
    """What happened, and the command that resumes the run from its last checkpoint."""
    detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    cause = f"lost contact with another rank ({type(error).__name__}: {detail}); a rank died or the network failed"
    return _stopped(ranks, iteration, checkpoint_iteration, run_dir, cause)


def _stopped(ranks: RankContext, iteration: int, checkpoint_iteration: int | None, run_dir, cause: str) -> str:
    saved = (f"The last checkpoint is {run_dir}/checkpoint.pt (iteration {checkpoint_iteration})" if checkpoint_iteration is not None
             else "No checkpoint was written yet, so the run starts over")
    return (
        f"rank {ranks.rank} of {ranks.world_size} stopped during iteration {iteration + 1}: it {cause}. {saved}; continue with: "
        f"torchrun <the same torchrun options: {ranks.world_size} processes in total> -m fracfx train --resume {run_dir} "
        "(torchrun --max-restarts N with --rdzv-backend c10d restarts it by itself)"
    )


def data_parallel(model: nn.Module, ranks: RankContext, *, sync_bn: bool = False, sync_ranges: bool = False) -> nn.Module:
    """`model` wrapped in DistributedDataParallel, after the optional statistics syncs (in place, see sync_stats)."""
    from torch.nn.parallel import DistributedDataParallel

    from fracfx.runtime.sync_stats import sync_batchnorm, sync_quantizer_ranges

    if sync_bn:
        sync_batchnorm(model, ranks)
    if sync_ranges:
        sync_quantizer_ranges(model, ranks)
    device_ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


# ---------------------------------------------------------------------------------------------
# Per-rank state in checkpoints, and the check that the ranks agree


def rounding_state(model: nn.Module) -> dict[str, Any]:
    """Every stochastic-rounding generator's state (per rank: each rank rounds with its own stream)."""
    from fracfx.nn.quantizers import GradQuant

    return {name: module.get_extra_state() for name, module in model.named_modules() if isinstance(module, GradQuant)}


def set_rounding_state(model: nn.Module, state: Mapping[str, Any]) -> None:
    from fracfx.nn.quantizers import GradQuant

    modules = {name: module for name, module in model.named_modules() if isinstance(module, GradQuant)}
    if set(modules) != set(state):
        raise DistributedError(f"the checkpoint's rounding generators ({len(state)}) do not match this model's ({len(modules)}); "
                               "resume with the same model and method")
    for name, module in modules.items():
        module.set_extra_state(state[name])


def fingerprint(model: nn.Module, iteration: int, schedule: Mapping[str, Any]) -> dict[str, Any]:
    """What must be identical on every rank: iteration, schedule position, digests of parameters and buffers."""
    from fracfx.runtime.checkpoint import payload_digest

    return {
        "iteration": iteration,
        "schedule": dict(schedule),
        "parameters_sha256": payload_digest({name: p.detach() for name, p in model.named_parameters()}),
        "buffers_sha256": payload_digest({name: b for name, b in model.named_buffers()}),
    }


def check_fingerprints(prints: Sequence[Mapping[str, Any]]) -> None:
    """Raise DistributedError naming the first rank whose fingerprint differs from rank 0's."""
    reference = prints[0]
    for rank, other in enumerate(prints[1:], start=1):
        differ = [key for key in reference if other.get(key) != reference[key]]
        if differ:
            raise DistributedError(
                f"rank {rank} drifted from rank 0 in {', '.join(differ)} (rank 0: {[reference[k] for k in differ]}, "
                f"rank {rank}: {[other.get(k) for k in differ]}); every rank must run the same fracfx version and command"
            )
