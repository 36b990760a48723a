"""Data-parallel language-model training: `torchrun -m fracfx train --arch transformer_lm --dataset kjv`.

The text loaders shard like the image loaders (fracfx.data.text.build_text_loaders: windows
rank, rank + world_size, ... of every global batch, and of the validation windows), so the
same two properties hold as for images (tests/train/test_data_parallel.py):
- slow: 2 ranks and 1 process at the same global batch end with the same turning points, the
  same validation perplexity to float round-off, and parameters within 1e-5 of the largest
  (SGD: the sums over half batches are reassociated; measured 7e-7), both ranks identical.
  (Adam is left out of the comparison: its first steps move every weight by about lr whatever
  the gradient's size, so a round-off sign flip of a near-zero gradient moves a weight a whole
  step; measured 1.4e-2 relative, with the same turning points.)
- slow: rank 1 SIGKILLed mid-run, then `--resume`, ends bit-identical to an uninterrupted 2-rank run.
- fast: the shards of every global batch and of the validation windows partition the
  single-process ones.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from fracfx.data.text import build_text_loaders, char_corpus
from fracfx.runtime.checkpoint import load_checkpoint
from tests.train.test_data_parallel import _assert_same_run, _largest_difference, _ok, _rank_fingerprints, single, torchrun

needs_kjv = pytest.mark.skipif(shutil.which("bible") is None, reason="the `bible` command (Debian package bible-kjv) is not installed")

LM = ["--arch", "transformer_lm", "--dataset", "kjv", "--context", "16", "--d-model", "16", "--n-layers", "1", "--n-heads", "2",
      "--batch-size", "8", "--train-subset", "200", "--test-subset", "16", "--iters", "12", "--eval-every", "4",
      "--lr", "0.3", "--seed", "1", "--threads", "1", "--no-progress"]
PFQ = ["--method", "pfq", "--window", "2", "--initial-threshold", "0.5", "--num-turning-point", "2",
       "--num-bits-schedule", "4", "6", "8", "--num-grad-bits-schedule", "8", "8", "8"]


@needs_kjv
@pytest.mark.slow
def test_two_ranks_reach_the_turning_points_of_one_process(tmp_path):
    args = [*LM, *PFQ, "--no-stochastic-grad", "--sync-ranges"]
    one = single(tmp_path / "one", *args)
    _ok(torchrun(tmp_path / "two", *args))
    two = load_checkpoint(tmp_path / "two" / "checkpoint.pt")

    prints = _rank_fingerprints(two)
    assert prints[0]["parameters_sha256"] == prints[1]["parameters_sha256"]
    turning = one["metrics"][-1]["turning_points"]
    assert turning, "the run must reach a turning point for the comparison to mean anything"
    assert two["metrics"][-1]["turning_points"] == prints[0]["schedule"]["turning_points"] == turning
    assert [m["stage"] for m in one["metrics"]] == [m["stage"] for m in two["metrics"]]
    for a, b in zip(one["metrics"], two["metrics"]):
        assert a["test_ppl"] == pytest.approx(b["test_ppl"], rel=1e-5)
        assert a["train_ppl"] == pytest.approx(b["train_ppl"], rel=1e-5)
        assert a["effective_macs"] == b["effective_macs"]
    difference, scale = _largest_difference(one, two)
    assert difference <= 1e-5 * scale, (difference, scale)


@needs_kjv
@pytest.mark.slow
def test_killed_rank_resumes_to_the_uninterrupted_run(tmp_path):
    args = [*LM, *PFQ]  # stochastic rounding on, per-rank ranges: the default data-parallel run
    _ok(torchrun(tmp_path / "straight", *args))
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")

    folder = tmp_path / "crashed"
    crashed = torchrun(folder, *args, killed_after=6)
    assert crashed.returncode != 0
    assert f"--resume {folder}" in crashed.stdout + crashed.stderr
    assert load_checkpoint(folder / "checkpoint.pt")["iteration"] == 4

    _ok(torchrun(folder, "--resume", str(folder), "--threads", "1", "--no-progress"))
    resumed = load_checkpoint(folder / "checkpoint.pt")
    assert resumed["finished"]
    _assert_same_run(straight, resumed, tmp_path / "straight", folder)


def test_text_shards_partition_the_single_process_batches():
    corpus = char_corpus("toy", "".join(chr(97 + (i * 7) % 26) for i in range(3000)))
    whole_train, whole_eval, info = build_text_loaders(corpus=corpus, batch_size=6, context=10, seed=4, eval_batch_size=5)
    shards = [build_text_loaders(corpus=corpus, batch_size=6, context=10, seed=4, eval_batch_size=5, rank=r, world_size=2) for r in range(2)]
    assert all(s[2] == info for s in shards)  # info describes the whole split on every rank

    whole_batches = list(whole_train.batch_sampler)
    rank_batches = [list(s[0].batch_sampler) for s in shards]
    assert all(len(b) == len(whole_batches) for b in rank_batches)
    for b, batch in enumerate(whole_batches):
        assert sorted(rank_batches[0][b] + rank_batches[1][b]) == sorted(batch)

    def windows(loader):
        return torch.cat([x for x, _ in loader])

    evaluated = torch.cat([windows(s[1]) for s in shards])
    expected = windows(whole_eval)
    assert len(evaluated) == len(expected)
    assert sorted(map(tuple, evaluated.tolist())) == sorted(map(tuple, expected.tolist()))
