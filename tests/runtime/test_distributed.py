"""fracfx.runtime.distributed and the runtime objects' `reduce=`: ranks simulated as threads.

ThreadGroup is a real collective (every member must call sum(), which waits for all), so the
PFQ/FracTrain indicator and the DFQ controller run here exactly as on N torchrun ranks, without
processes: what they decide on N shares must be what one process decides on the whole batch.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fracfx
from fracfx.errors import ConfigError, DistributedError
from fracfx.models.cifar_resnet import cifar_resnet20
from fracfx.runtime import DFQController, PlateauIndicator, PlateauTracker
from fracfx.runtime.distributed import (
    Launch, check_fingerprints, elastic_restart_count, fingerprint, is_peer_failure, launch_environment,
    peer_failure_message, RankContext, seed_for_rank, terminated_message,
)
from tests.runtime.loss_scripts import EXPECTED_TURNING_WINDOWS, SCRIPT
from tests.runtime.thread_ranks import ThreadGroup, run_ranks


# --- the plateau indicator over ranks -----------------------------------------------------------


def _tracker(reduce=None) -> PlateauTracker:
    indicator = PlateauIndicator(num_turning_point=4, initial_threshold=0.25, decay=0.5)
    return PlateauTracker(window=2, indicator=indicator, reduce=reduce)


def _iteration_losses() -> list[float]:
    return [loss for loss in SCRIPT for _ in range(2)]  # window 2: both iterations at the window's loss


def _iteration_shares(rank: int) -> list[float]:
    """Per-rank shares that sum to each iteration's global loss but, alone, never plateau."""
    shares = []
    for index, loss in enumerate(_iteration_losses()):
        noise = 0.1 * ((index // 2) % 3 - 1)  # -0.1, 0, +0.1 by window, cancelling over the two ranks
        shares.append(loss / 2 + noise if rank == 0 else loss / 2 - noise)
    return shares


def test_two_ranks_feeding_shares_switch_where_one_process_does_and_reduce_once_per_window():
    single = _tracker()
    for loss in _iteration_losses():
        single.step(loss)
    assert [i for i, _ in single.turning_points] == [2 * w for w in EXPECTED_TURNING_WINDOWS]

    def rank_run(rank, member):
        tracker = _tracker(member)
        for share in _iteration_shares(rank):
            tracker.step(share)
        return tracker.turning_points

    (points0, points1), group = run_ranks(2, rank_run)
    assert points0 == points1  # every rank decides alike
    assert [i for i, _ in points0] == [i for i, _ in single.turning_points]
    assert [l for _, l in points0] == pytest.approx([l for _, l in single.turning_points], rel=1e-12)
    assert group.calls == len(SCRIPT)  # one all_reduce per window, none per iteration

    alone = _tracker()  # the control: a rank that decided on its own share alone would switch elsewhere
    for share in _iteration_shares(0):
        alone.step(share)
    assert [i for i, _ in alone.turning_points] != [i for i, _ in single.turning_points]


def test_a_window_open_at_a_checkpoint_resumes_to_the_same_decisions():
    cut = 2 * 13 + 1  # mid-window, between turning points 1 and 2

    def straight(rank, member):
        tracker = _tracker(member)
        for index, share in enumerate(_iteration_shares(rank)):
            if index == cut:
                tracker.sync()  # what the trainer does at every checkpoint, resumed or not
            tracker.step(share)
        return tracker.turning_points

    def interrupted(rank, member):
        shares = _iteration_shares(rank)
        tracker = _tracker(member)
        for share in shares[:cut]:
            tracker.step(share)
        with pytest.raises(ConfigError, match="call sync"):
            tracker.state_dict()
        tracker.sync()
        state = tracker.state_dict()  # rank 0's would be the checkpoint; every rank's is the same
        resumed = _tracker(member)
        resumed.load_state_dict(state)
        for share in shares[cut:]:
            resumed.step(share)
        return state, resumed.turning_points

    expected, _ = run_ranks(2, straight)
    ((state0, got0), (state1, got1)), _ = run_ranks(2, interrupted)
    assert state0 == state1 and state0["window_count"] == 1
    assert got0 == got1 == expected[0]


def test_tracker_refuses_a_reduce_without_sum():
    with pytest.raises(ConfigError, match="sum"):
        PlateauTracker(window=2, reduce=object())


# --- the DFQ cost term over ranks ---------------------------------------------------------------


EXAMPLE = torch.randn(2, 3, 16, 16)


def test_dfq_cp_usage_and_cost_gradient_over_two_ranks_equal_one_process_on_the_whole_batch():
    torch.manual_seed(0)
    model = fracfx.transform(cifar_resnet20(num_classes=10), fracfx.DFQConfig(), example_inputs=EXAMPLE).eval()
    batch = torch.randn(8, 3, 16, 16)  # eval mode: each sample's gate choice is its own, whatever the batch

    def gate_grads(gm):
        return {n: p.grad.clone() for n, p in gm.named_parameters() if n.startswith("fracfx_gate") and p.grad is not None}

    single = copy.deepcopy(model)
    controller = DFQController(single, target_ratio=3.0)
    single(batch)
    controller.cost_loss().backward()
    expected = (controller.last_cp, controller.usage_counts, gate_grads(single))

    def rank_run(rank, member):
        gm = copy.deepcopy(model)
        rank_controller = DFQController(gm, target_ratio=3.0, reduce=member)
        gm(batch[rank::2])
        rank_controller.cost_loss().backward()
        assert rank_controller.cp == rank_controller.last_cp  # a second look costs no collective
        return rank_controller.last_cp, rank_controller.usage_counts, rank_controller.last_counts, gate_grads(gm)

    ranks, group = run_ranks(2, rank_run)
    assert group.calls == 1
    (cp0, usage0, counts0, grads0), (cp1, usage1, counts1, grads1) = ranks
    assert cp0 == cp1 == pytest.approx(expected[0], rel=1e-6)
    assert usage0 == usage1 == expected[1]
    assert [sum(row) for row in counts0] == [8] * len(counts0)
    assert grads0.keys() == expected[2].keys() and grads0
    for name, grad in expected[2].items():  # DDP averages the ranks' gradients
        torch.testing.assert_close((grads0[name] + grads1[name]) / 2, grad, rtol=1e-5, atol=1e-9)


def test_dfq_controller_refuses_a_reduce_without_world_size():
    model = fracfx.transform(cifar_resnet20(num_classes=10), fracfx.DFQConfig(), example_inputs=EXAMPLE)
    with pytest.raises(ConfigError, match="world_size"):
        DFQController(model, target_ratio=3.0, reduce=ThreadGroup(2))  # the group, not a member


# --- plain helpers --------------------------------------------------------------------------------


def test_launch_environment_reads_torchrun_variables():
    assert launch_environment({}) is None
    assert launch_environment({"WORLD_SIZE": "1", "RANK": "0"}) is None  # one process: the plain trainer
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
           "TORCHELASTIC_RESTART_COUNT": "2"}
    assert launch_environment(env) == Launch(rank=3, world_size=4, local_rank=1, restart_count=2)
    with pytest.raises(DistributedError, match="WORLD_SIZE is not"):
        launch_environment({"RANK": "1"})
    with pytest.raises(DistributedError, match="does not fit"):
        launch_environment({**env, "RANK": "4"})
    with pytest.raises(DistributedError, match="MASTER_PORT not set"):
        launch_environment({k: v for k, v in env.items() if k != "MASTER_PORT"})
    with pytest.raises(DistributedError, match="not a rank number"):
        launch_environment({**env, "RANK": "x"})
    assert elastic_restart_count({}) == 0 and elastic_restart_count({"TORCHELASTIC_RESTART_COUNT": "3"}) == 3


def test_rank_seeds_keep_rank_zero_and_differ_per_rank():
    assert seed_for_rank(7, 0) == 7
    seeds = {seed_for_rank(7, r) for r in range(1, 64)}
    assert len(seeds) == 63 and 7 not in seeds and all(0 <= s < 2**31 for s in seeds)
    fracfx.seed_rounding(fracfx.transform(torch.nn.Linear(2, 2)), max(seeds))  # in range for the generators


def test_peer_failures_are_recognised_and_explained():
    gloo = RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer")
    assert is_peer_failure(gloo) and is_peer_failure(torch.distributed.DistNetworkError("gone"))
    assert not is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_peer_failure(ConfigError("gloo"))
    ranks = RankContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo")
    message = peer_failure_message(ranks, 18, 16, "runs/x", gloo)
    assert "rank 0 of 2 stopped during iteration 19: it lost contact" in message and "runs/x/checkpoint.pt (iteration 16)" in message
    assert "--resume runs/x" in message and "2 processes in total" in message
    assert "starts over" in peer_failure_message(ranks, 3, None, "runs/x", gloo)
    stopped = terminated_message(ranks, 18, 16, "runs/x")
    assert "rank 0 of 2 stopped during iteration 19: it received SIGTERM" in stopped and "--resume runs/x" in stopped


def test_fingerprints_name_the_rank_and_what_drifted():
    model = torch.nn.Linear(3, 2)
    a = fingerprint(model, 5, {"stage": 1})
    check_fingerprints([a, dict(a)])
    with torch.no_grad():
        model.bias[0] += 1e-7
    b = fingerprint(model, 5, {"stage": 1})
    with pytest.raises(DistributedError, match="rank 1 drifted from rank 0 in parameters_sha256"):
        check_fingerprints([a, b])
    with pytest.raises(DistributedError, match="rank 2 drifted from rank 0 in schedule"):
        check_fingerprints([a, a, fingerprint(torch.nn.Linear(3, 2), 5, {"stage": 2}) | {"parameters_sha256": a["parameters_sha256"], "buffers_sha256": a["buffers_sha256"]}])
