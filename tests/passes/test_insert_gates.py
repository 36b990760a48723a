"""insert_gates and transform(DFQConfig): gate subgraphs, mixed quantizers, per-sample exactness."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fracfx
from tests.passes.conftest import force
from fracfx.config import CIFAR_CANDIDATES
from fracfx.nn.mixed import MixedActQuant, MixedGradQuant
from fracfx.errors import ConfigError
from fracfx.nn.gates import GateChoice
from fracfx.meta import get_binding, get_block, get_quant_spec
from fracfx.models.cifar_resnet import cifar_resnet20


EXAMPLE = torch.randn(2, 3, 16, 16)


def dfq(model, **options):
    return fracfx.transform(model, fracfx.DFQConfig(**options), example_inputs=EXAMPLE)




def choices(gm):
    return {get_block(n).module_path: gm.get_submodule(n.target).last_choice
            for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), GateChoice)}


def static_twin(model, dfq_gm, bits_of_block):
    """The static-precision model with dfq_gm's weights and statistics, bits set per block."""
    static = fracfx.transform(model, fracfx.QuantConfig(weight_bits=4, keep_fp32=("@first", "@last")), example_inputs=EXAMPLE)
    static.load_state_dict(dfq_gm.state_dict(), strict=False)
    return set_block_bits(static, bits_of_block)


def set_block_bits(static, bits_of_block):
    for node in static.graph.nodes:
        binding = get_binding(node)
        if binding is None:
            continue
        path = get_quant_spec(node).module_path
        (a, g), = [bits for block, bits in bits_of_block.items() if path.startswith(block + ".")]
        for target in binding.act:
            static.get_submodule(target).set_bits(a)
        static.get_submodule(binding.grad).set_bits(g)
    return static


def test_gate_subgraph_is_in_the_graph_with_one_shared_lstm():
    model = cifar_resnet20()
    gm = dfq(model)
    text = str(gm.graph)
    assert "fracfx_gate_embed_0" in text and "fracfx_gate_choice_8" in text
    assert sum(isinstance(m, nn.LSTMCell) for m in gm.modules()) == 1
    steps = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "fracfx_gate.lstm"]
    assert len(steps) == 9 and len(steps[0].args) == 1  # zero state at the first block
    assert all(step.args[1] is previous for previous, step in zip(steps, steps[1:]))
    # the first gate embeds the stem output, which is the first block's input
    embed = next(n for n in gm.graph.nodes if n.target == "fracfx_gate.embed.0")
    assert embed.args[0].target == "relu"
    # no K-fold recomputation: as many convs as the static model
    static = fracfx.transform(model, fracfx.QuantConfig(), example_inputs=EXAMPLE)
    is_conv = lambda g, n: n.target is torch.conv2d or n.op == "call_module" and type(g.get_submodule(n.target)) is nn.Conv2d
    count = lambda g: sum(is_conv(g, n) for n in g.graph.nodes)
    assert count(gm) == count(static) == 21
    # every quantizer of a gated op takes the mask of its own block's gate
    masks = {get_block(n).index: n for n in gm.graph.nodes if get_block(n) is not None and n.op == "call_module"}
    mixed = 0
    for node in gm.graph.nodes:
        binding = get_binding(node)
        if binding is None:
            continue
        for target in binding.act + (binding.grad,):
            quant = next(n for n in gm.graph.nodes if n.target == target)
            assert isinstance(gm.get_submodule(target), (MixedActQuant, MixedGradQuant))
            assert quant.args[1] is masks[get_block(node).index]
            mixed += 1
    assert mixed == 2 * 20


def test_each_sample_equals_the_static_model_at_its_own_bits():
    model = cifar_resnet20()
    gm = dfq(model)
    head = gm.get_submodule("fracfx_gate.head")
    with torch.no_grad():
        head.weight.mul_(300.0)  # make the choice depend strongly on the input
    x = torch.randn(8, 3, 16, 16) * torch.arange(1, 9).view(8, 1, 1, 1) + torch.randn(8, 3, 1, 1)
    with torch.no_grad():
        gm.train()(x)  # running ranges and BN statistics
        out = gm.eval()(x)
    picked = choices(gm)
    assert sum(len(set(c.tolist())) > 1 for c in picked.values()) >= 3, "choices must differ between samples"
    static = static_twin(model, gm, {block: (8, 8) for block in picked}).eval()
    for sample in range(len(x)):
        bits = {block: CIFAR_CANDIDATES[int(c[sample])] for block, c in picked.items()}
        with torch.no_grad():
            expected = set_block_bits(static, bits)(x)
        assert torch.equal(out[sample], expected[sample]), sample


def test_batch_size_one_and_ties_match_the_static_model_in_training():
    model = cifar_resnet20()
    gm = dfq(model)
    force(gm, None)  # equal logits: the first candidate, (3, 6), everywhere
    x = torch.randn(1, 3, 16, 16)
    static = static_twin(model, gm, {f"layer{s}.{b}": (3, 6) for s in (1, 2, 3) for b in range(3)})
    out, expected = gm.train()(x), static.train()(x)
    assert torch.equal(out, expected)
    assert all(c.tolist() == [0] for c in choices(gm).values())
    out.square().sum().backward()
    expected.square().sum().backward()
    w_dfq, w_static = gm.get_submodule("layer2.1.conv1").weight.grad, static.get_submodule("layer2.1.conv1").weight.grad
    assert torch.allclose(w_dfq, w_static, rtol=1e-4, atol=1e-6)  # same seeds, same 6-bit gradient grid


def test_fp32_candidate_is_the_float_model():
    model = cifar_resnet20()
    gm = dfq(model, candidates=((3, 6), "fp32"))
    force(gm, 1)
    x = torch.randn(4, 3, 16, 16)
    for train in (True, False):
        assert torch.equal(gm.train(train)(x), model.train(train)(x))


def test_skip_candidate_outputs_the_shortcut_chain():
    model = cifar_resnet20().eval()
    gm = dfq(model, candidates=((4, 8), "skip")).eval()
    force(gm, 1)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h = model.relu(model.bn1(model.conv1(x)))
        for stage in (model.layer2, model.layer3):  # identity blocks pass h; projections map it
            ds = stage[0].downsample
            w = ds[0].weight
            lo = w.amin((1, 2, 3), keepdim=True)
            s = torch.clamp((w.amax((1, 2, 3), keepdim=True) - lo) / 15, min=1e-8)
            h = ds[1](F.conv2d(h, torch.round(torch.clamp((w - lo) / s, 0, 15)) * s + lo, None, 2))
        expected = model.fc(model.avgpool(h).flatten(1))
        assert torch.allclose(gm(x), expected, rtol=1e-5, atol=1e-6)


def test_resnet18_trains_a_step_with_the_cost_term():
    gm = fracfx.transform(torchvision.models.resnet18(num_classes=5), fracfx.DFQConfig(weight_bits=6), example_inputs=torch.randn(1, 3, 32, 32))
    controller = fracfx.runtime.DFQController(gm, target_ratio=3.0)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    loss = F.cross_entropy(gm.train()(x), y) + controller.cost_loss()
    loss.backward()
    assert gm.get_submodule("fracfx_gate.head").weight.grad.abs().sum() > 0
    assert gm.get_submodule("fracfx_gate.embed.7.layers.0").weight.grad is not None
    optimizer.step()
    assert sum(controller.usage["layer4.1"].values()) == 2
    assert gm.eval()(x[:1]).shape == (1, 5)


def test_configuration_errors():
    with pytest.raises(ConfigError, match="example_inputs"):
        fracfx.transform(cifar_resnet20(), fracfx.DFQConfig())
    with pytest.raises(ConfigError, match="remove 'skip'"):
        fracfx.transform(torchvision.models.mobilenet_v2(), fracfx.DFQConfig(candidates=((4, 8), "skip"), block_types=("InvertedResidual",)), example_inputs=torch.randn(1, 3, 32, 32))


def test_insert_gates_leaves_its_input_untouched():
    from fracfx.passes.annotate_blocks import annotate_blocks
    from fracfx.passes.annotate_cost import annotate_cost
    from fracfx.passes.annotate_quant import annotate_quant
    from fracfx.passes.capture import capture_graph
    from fracfx.passes.insert_gates import insert_gates
    from fracfx.passes.insert_quant import insert_quant
    from fracfx.passes.propagate_shapes import propagate_shapes

    gm = annotate_quant(capture_graph(cifar_resnet20()), keep_fp32=("@first", "@last"))
    gm = insert_quant(annotate_cost(annotate_blocks(propagate_shapes(gm, example_inputs=(EXAMPLE,)))))
    snapshot = lambda g: (g.code, {k: type(m) for k, m in g.named_modules()}, [dict(n.meta) for n in g.graph.nodes],
                          {k: v.clone() for k, v in g.state_dict().items() if isinstance(v, torch.Tensor)})
    before = snapshot(gm)
    out = insert_gates(gm, candidates=CIFAR_CANDIDATES + ("skip", "fp32"))
    after = snapshot(gm)
    assert out is not gm and after[:3] == before[:3]
    assert all(torch.equal(after[3][k], v) for k, v in before[3].items())
    # the mixed quantizers are new modules: training the output leaves gm's quantizers alone
    # (unchanged layers such as BN are shared between passes' inputs and outputs by design)
    out(EXAMPLE).sum().backward()
    after = snapshot(gm)[3]
    assert all(torch.equal(after[k], v) for k, v in before[3].items() if k.startswith("fracfx_quant"))
