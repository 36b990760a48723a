"""runtime/sync_stats.py with 2 ranks, each holding half a batch: as threads (fast) and as a real
2-process gloo group on 127.0.0.1 (slow).

CrossRankBatchNorm (float64, so the comparison is not drowned in float32 rounding) must give
the outputs, input gradients, DDP-averaged weight gradients and running statistics of
BatchNorm on the whole batch to 1e-12; quantizers with RangeSync must give bit-identical rows
(min and max do not round), and without it they must not. Each rank's loss is scaled by 2 (the
world size), as the trainer's. Random data comes from local generators (threads share torch's).
"""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest
import torch

from fracfx.bench.timing import free_port
from tests.runtime.thread_ranks import run_ranks

TIMEOUT_S = 120


def _check_batchnorm(ranks, rank: int) -> dict:
    from fracfx.runtime.sync_stats import CrossRankBatchNorm, sync_batchnorm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64, generator=g) * 3 + 1
    upstream = torch.randn(x.shape, dtype=x.dtype, generator=g)
    reference = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        reference.weight.uniform_(generator=g)
        reference.bias.uniform_(generator=g)
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3).double())
    model.load_state_dict({"0." + k: v for k, v in reference.state_dict().items()})
    assert sync_batchnorm(model, ranks) == 1 and isinstance(model[0], CrossRankBatchNorm)

    whole = x.clone().requires_grad_()
    (reference(whole) * upstream).sum().backward()
    half = x[rank::2].clone().requires_grad_()
    out = model(half)
    (out * upstream[rank::2] * 2).sum().backward()
    weight_grad = ranks.sum_(model[0].weight.grad.clone()) / 2  # what DDP's average gives
    model.eval()
    eval_out = model(x[rank::2])  # eval: plain BatchNorm on the (updated) running statistics
    reference.eval()
    return {
        "output": (out.detach() - _ref_out(x, reference)[rank::2]).abs().max().item(),
        "input_grad": (half.grad / 2 - whole.grad[rank::2]).abs().max().item(),
        "weight_grad": (weight_grad - reference.weight.grad).abs().max().item(),
        "running_var": (model[0].running_var - reference.running_var).abs().max().item(),
        "running_mean": (model[0].running_mean - reference.running_mean).abs().max().item(),
        "eval": (eval_out - reference(x)[rank::2]).abs().max().item(),
    }


def _ref_out(x, reference):
    """The reference's training-mode output on the whole batch, leaving its running statistics alone."""
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    was = reference.training
    reference.train()
    with torch.no_grad():
        out = reference(x)
    reference.load_state_dict(state)
    reference.train(was)
    return out


def _check_quantizers(ranks, rank: int) -> dict:
    from fracfx.nn.mixed import MixedActQuant, MixedGradQuant
    from fracfx.nn.gates import CandidateTable
    from fracfx.nn.quantizers import ActQuant, GradQuant
    from fracfx.runtime.sync_stats import sync_quantizer_ranges

    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, 6, 6, generator=g)
    x[3, 0, 0, 0] = 9.0  # the global max lives on rank 1: rank 0 alone would pick another grid
    upstream = torch.randn(x.shape, generator=g)
    upstream[6, 1, 2, 2] = -7.0  # the gradient's min lives on rank 0
    table = CandidateTable(((3, 6), (4, 8), (6, 12)))
    mask = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1, 0, 0, 2, 1]), 3).float()
    results = {}

    def make():
        return torch.nn.ModuleDict({"act": ActQuant(4), "grad": GradQuant(4, stochastic=False),
                                    "mixed_act": MixedActQuant(table), "mixed_grad": MixedGradQuant(table, stochastic=False)})

    whole, shard = make(), make()
    assert sync_quantizer_ranges(shard, ranks) == 4
    expected = whole["act"](x)[rank::2]
    results["act"] = torch.equal(shard["act"](x[rank::2]), expected)
    results["act_differs_alone"] = not torch.equal(make()["act"](x[rank::2]), expected)
    results["act_running"] = torch.equal(shard["act"].running_range, whole["act"].running_range)
    results["mixed_act"] = torch.equal(shard["mixed_act"](x[rank::2], mask[rank::2]), whole["mixed_act"](x, mask)[rank::2])
    for name, call in (("grad", lambda q, t, m: q(t)), ("mixed_grad", lambda q, t, m: q(t, m))):
        full = x.clone().requires_grad_()
        call(whole[name], full, mask).backward(upstream)
        part = x[rank::2].clone().requires_grad_()
        call(shard[name], part, mask[rank::2]).backward(upstream[rank::2])
        results[name] = torch.equal(part.grad, full.grad[rank::2])
        alone = x[rank::2].clone().requires_grad_()  # control: without the sync the rows differ
        call(make()[name], alone, mask[rank::2]).backward(upstream[rank::2])
        results[name + "_differs_alone"] = not torch.equal(alone.grad, full.grad[rank::2])
    return results


def _checks(ranks, rank: int) -> dict:
    return {"batchnorm": _check_batchnorm(ranks, rank), "quantizers": _check_quantizers(ranks, rank)}


def _worker(rank: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    from fracfx.runtime.distributed import RankContext

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        ranks = RankContext(rank, 2, rank, torch.device("cpu"), "gloo")
        result = _checks(ranks, rank)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)


def _gloo_ranks(folder: str) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=_worker, args=(rank, port, folder)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(TIMEOUT_S)
    hung = [p for p in processes if p.is_alive()]
    for process in hung:
        process.kill()
    assert not hung, f"a rank hung for {TIMEOUT_S} s"
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    return [json.load(open(os.path.join(folder, f"rank{rank}.json"))) for rank in range(2)]


def _assert_whole_batch(results: list[dict]) -> None:
    for result in results:
        for name, error in result["batchnorm"].items():
            assert error < 1e-12, (name, error)
        assert all(result["quantizers"].values()), result["quantizers"]


def test_two_thread_ranks_compute_what_one_process_computes_on_the_whole_batch():
    results, _ = run_ranks(2, lambda rank, member: _checks(member, rank))
    _assert_whole_batch(results)


@pytest.mark.slow
def test_two_gloo_processes_compute_what_one_process_computes_on_the_whole_batch(tmp_path):
    _assert_whole_batch(_gloo_ranks(str(tmp_path)))
