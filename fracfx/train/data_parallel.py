"""Data-parallel training under torchrun: the process group around a run, the DDP wrapper, and
each rank's own random streams in the checkpoint (see fracfx.runtime.distributed).

Every rank runs the same loop on its share of each global batch (--batch-size is the global
batch); schedules are decided on global statistics; rank 0 writes the run's files.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from torch import nn

from fracfx.errors import DistributedError
from fracfx.train.checkpointing import rng_state, seed_everything


class ProcessGroup:
    """`with ProcessGroup(launch, device, run_dir) as group:` starts the ranks (none without
    torchrun), turns SIGTERM into an exception, and replaces a peer's failure or torchrun's
    SIGTERM by a DistributedError that says where the run stopped and how to resume it.
    Set `group.session` once the session exists (for that message)."""

    def __init__(self, launch, device: str, run_dir):
        self.launch, self.device, self.run_dir = launch, device, run_dir
        self.ranks, self.session, self._previous = None, None, None

    def __enter__(self):
        from fracfx.runtime import distributed

        self.ranks = None if self.launch is None else distributed.start(self.launch, self.device)
        if self.ranks is not None and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, _raise_terminated)
        return self

    def __exit__(self, kind, error, traceback):
        from fracfx.runtime import distributed

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        distributed.stop(self.ranks, finished=error is None)
        if self.ranks is None or error is None or not isinstance(error, Exception):
            return False
        terminated = isinstance(error, distributed.Terminated)
        if not (terminated or distributed.is_peer_failure(error)):
            return False
        iteration = 0 if self.session is None else self.session.iteration
        saved = None if self.session is None else self.session.checkpoint_iteration
        if terminated:
            raise DistributedError(distributed.terminated_message(self.ranks, iteration, saved, self.run_dir)) from None
        raise DistributedError(distributed.peer_failure_message(self.ranks, iteration, saved, self.run_dir, error)) from error


def _raise_terminated(signum, frame):
    from fracfx.runtime.distributed import Terminated

    raise Terminated()


def wrap(model: nn.Module, ranks, config) -> nn.Module:
    """Per-rank random streams (rank 0 keeps the single-process ones), synced statistics, DDP."""
    from fracfx.nn.precision import seed_rounding
    from fracfx.runtime.distributed import data_parallel, seed_for_rank

    if ranks.rank:
        seed_rounding(model, seed_for_rank(config.seed, ranks.rank))
        seed_everything(seed_for_rank(config.seed, ranks.rank))
    return data_parallel(model, ranks, sync_bn=config.sync_bn, sync_ranges=config.sync_ranges)


def rank_states(session) -> list[dict[str, Any]]:
    """Every rank's own random streams and fingerprint (a collective); refuses ranks that drifted apart."""
    from fracfx.runtime.distributed import check_fingerprints, fingerprint, rounding_state

    status = session.recipe.status()
    schedule = {"bits": [status.act, status.weight, status.grad], "stage": status.stage, "turning_points": list(status.turning_points)}
    mine = {"rng": rng_state(), "rounding": rounding_state(session.model),
            "fingerprint": fingerprint(session.model, session.iteration, schedule)}
    states = session.ranks.gather(mine)
    check_fingerprints([s["fingerprint"] for s in states])
    return states
