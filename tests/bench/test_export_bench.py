"""`fracfx bench export`: every file of the comparison is written and timed (one tiny arch)."""

from __future__ import annotations

from fracfx.bench import export as bench_export


def test_bench_times_all_five_files_and_prints_the_machine():
    lines = []
    rows = bench_export.bench(("cifar_resnet20",), (2,), repeats=1, sizes={"cifar_resnet20": 16}, log=lines.append)
    assert len(rows) == 1 and set(rows[0].ms) == set(bench_export.VARIANTS)
    assert all(ms > 0 for ms in rows[0].ms.values())
    assert lines and "cifar_resnet20" in lines[0] and "(x" in lines[0]
    assert "flags" in bench_export.machine()
