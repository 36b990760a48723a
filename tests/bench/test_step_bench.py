"""fracfx bench step: every run timed in one process, ratios against the right baseline, the quantizers' share."""

import pytest

from fracfx.bench.step import run_step_benchmark


def test_eager_runs_and_quantizer_share_on_a_tiny_setting():
    report = run_step_benchmark(arch="cifar_resnet20", batch_size=4, input_size=8, runs=("fp32", "static", "dfq"), repeats=2,
                                profile_steps=1)
    assert [t.name for t in report.timings] == ["fp32", "8/8/8", "dfq"]
    assert all(len(t.seconds) == 2 and min(t.seconds) > 0 for t in report.timings)
    assert report.baselines == {"fp32": "fp32", "8/8/8": "fp32", "dfq": "fp32"}
    assert report.ratio("8/8/8") == pytest.approx(report.timing("8/8/8").median / report.timing("fp32").median)
    assert 0 < report.quantizer_share < 1
    assert report.compile_seconds == {}


@pytest.mark.slow  # two inductor compiles: ~3 min cold
def test_compiled_static_run_is_compared_with_compiled_fp32():
    report = run_step_benchmark(arch="cifar_resnet20", batch_size=2, input_size=8, runs=("fp32", "fp32-compiled", "static-compiled"),
                                repeats=1, profile_steps=0)
    assert report.baselines["8/8/8 compiled"] == "fp32 compiled"
    assert set(report.compile_seconds) == {"fp32 compiled", "8/8/8 compiled"}
    assert report.quantizer_share is None


def test_unknown_run_is_refused():
    with pytest.raises(ValueError, match="unknown runs"):
        run_step_benchmark(runs=("fp32", "int4"))


def test_compile_mode_is_set_for_the_call_and_reported():
    from fracfx.nn import quant

    before = quant.compile_mode
    report = run_step_benchmark(arch="cifar_resnet20", batch_size=2, input_size=8, runs=("fp32",), repeats=1, profile_steps=0,
                                compile_mode="ops")
    assert report.compile_mode == "ops" and quant.compile_mode == before
    with pytest.raises(ValueError, match="unknown compile mode"):
        run_step_benchmark(runs=("fp32",), compile_mode="inductor")
    assert quant.compile_mode == before
