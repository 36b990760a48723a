"""pin_candidates: a DFQ model -> a static one; the gate subgraph is gone, choices are checked."""

import pytest
import torch

import fracfx
from fracfx.errors import ConfigError
from fracfx.meta import FP32_ROWS, GATE_ROLES, SKIP_MIX, get_inserted
from fracfx.models import build_model
from fracfx.nn.mixed import MixedActQuant, MixedGradQuant
from fracfx.nn.quantizers import ActQuant, GradQuant
from fracfx.passes.infra import gate_choices
from fracfx.passes.pin_candidates import pin_candidates

EXAMPLE = torch.randn(2, 3, 8, 8)
CANDIDATES = ((4, 8), (6, 12), "skip", "fp32")


@pytest.fixture(scope="module")
def dfq():
    return fracfx.transform(build_model("cifar_resnet20"), fracfx.DFQConfig(candidates=CANDIDATES), example_inputs=EXAMPLE)


def roles(gm):
    return [get_inserted(n).role for n in gm.graph.nodes if get_inserted(n) is not None]


def test_op_counts_after_pinning(dfq):
    blocks = sorted(gate_choices(dfq))
    assert len(blocks) == 9 and any(r in GATE_ROLES for r in roles(dfq))
    out = pin_candidates(dfq, choices={i: i % 2 for i in blocks})
    assert not any(r in GATE_ROLES + (FP32_ROWS, SKIP_MIX) for r in roles(out))
    assert not any(isinstance(m, (MixedActQuant, MixedGradQuant)) for m in out.modules())
    bits = sorted({m.current_bits for m in out.modules() if type(m) is ActQuant})
    assert bits == [4, 6]  # the two candidates (the ungated first and last layers stay FP32)


def test_a_skipped_block_computes_its_shortcut(dfq):
    skip_all = pin_candidates(dfq, choices={i: 2 for i in gate_choices(dfq)}).eval()
    fp32_all = pin_candidates(dfq, choices={i: 3 for i in gate_choices(dfq)}).eval()
    assert len(skip_all.graph.nodes) < len(fp32_all.graph.nodes)  # skipped bodies are dead code, removed
    grads = [m for m in fp32_all.modules() if type(m) is GradQuant]
    assert any(m.current_bits == 0 for m in grads)
    x = torch.randn(2, 3, 8, 8)
    assert skip_all(x).shape == fp32_all(x).shape == (2, 10)


def test_choices_must_name_every_block_with_a_candidate_index(dfq):
    with pytest.raises(ConfigError, match="missing \\[8\\]"):
        pin_candidates(dfq, choices={i: 0 for i in range(8)})
    with pytest.raises(ConfigError, match="not a candidate index"):
        pin_candidates(dfq, choices={i: 9 for i in range(9)})
    static = fracfx.transform(build_model("cifar_resnet20"))
    with pytest.raises(ConfigError, match="needs a DFQ model"):
        pin_candidates(static, choices={})


def test_the_public_pinning_runs_through_the_pass_runner(dfq):
    from fracfx.api import gate_choices as public_gate_choices
    from fracfx.api import pin_candidates as public_pin

    assert public_gate_choices(dfq).keys() == gate_choices(dfq).keys()
    with pytest.raises(ConfigError, match=r"pass 'pin_candidates' failed \(after nothing \(the first pass\)\): .*missing"):
        public_pin(dfq, choices={})
    pinned = public_pin(dfq, choices={i: 0 for i in gate_choices(dfq)})
    assert not any(get_inserted(n) is not None and get_inserted(n).role in GATE_ROLES for n in pinned.graph.nodes)
