"""Ranks simulated as threads, for tests of the runtime's collectives without processes.

member(rank) offers what fracfx.runtime.distributed.RankContext offers the runtime (world_size,
rank, sum(values), and the in-place tensor collectives sum_ / min_); each call is a real
collective: it waits until every member has made it, and all get the same result.
"""

from __future__ import annotations

import threading

import torch


class ThreadGroup:
    def __init__(self, world_size: int):
        self.world_size, self.calls = world_size, 0
        self._barrier = threading.Barrier(world_size, timeout=60)
        self._slots: list = [None] * world_size

    def member(self, rank: int) -> "Member":
        return Member(self, rank)

    def _exchange(self, rank: int, value, combine):
        self._slots[rank] = value
        self._barrier.wait()
        result = combine(self._slots)  # in rank order: the same result on every member
        if rank == 0:
            self.calls += 1
        self._barrier.wait()  # nobody overwrites a slot before everyone has read
        return result


class Member:
    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.world_size

    def sum(self, values):
        return self.group._exchange(self.rank, [float(v) for v in values], lambda slots: [sum(c) for c in zip(*slots)])

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        total = self.group._exchange(self.rank, tensor.detach().clone(), lambda slots: sum(slots[1:], slots[0].clone()))
        return tensor.copy_(total)

    def min_(self, tensor: torch.Tensor) -> torch.Tensor:
        low = self.group._exchange(self.rank, tensor.detach().clone(), lambda slots: torch.stack(slots).amin(0))
        return tensor.copy_(low)


def run_ranks(world_size: int, fn):
    """fn(rank, member) on `world_size` threads; (their results in rank order, the group); a failure is re-raised."""
    group = ThreadGroup(world_size)
    results, errors = [None] * world_size, []

    def body(rank):
        try:
            results[rank] = fn(rank, group.member(rank))
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            errors.append(error)
            group._barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "a simulated rank hung"
    return results, group
