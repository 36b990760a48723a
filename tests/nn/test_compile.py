"""torch.compile(model) of a transformed model: one graph, no breaks, and the same training numbers.

The quantizers' kernels are custom ops with fake implementations and the rounding noise is a pure
function of tensors and ints (no torch.Generator), so dynamo traces the quantizers whole. What it
traces for them is fracfx.nn.quant.compile_mode (docs/kernels.md, "torch.compile"): every form
must give the eager values bit for bit, and the default one must let inductor fuse them.
"""

import pytest
import torch

import fracfx
from fracfx.models import build_model
from fracfx.nn import quant
from fracfx.models.transformer_lm import transformer_lm

CONFIG = fracfx.QuantConfig(act_bits=8, weight_bits=8, grad_bits=8)


def _breaks(model, *inputs):
    import torch._dynamo

    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(*inputs)
    return explained.graph_count, explained.graph_break_count, [str(b.reason) for b in explained.break_reasons]


def _conv_net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10))


def test_small_transformed_model_has_no_graph_breaks():
    gm = fracfx.transform(_conv_net(), CONFIG).train()
    graphs, breaks, reasons = _breaks(gm, torch.randn(4, 3, 8, 8))
    assert (graphs, breaks) == (1, 0), reasons


def test_compiled_training_step_matches_eager_bit_for_bit():
    """Same weights, same batch, same noise counter: the compiled step computes the eager step's numbers."""
    import copy

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = fracfx.transform(_conv_net(), CONFIG).train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager")  # the same ops, no inductor codegen (fast)
    x, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    for model in (eager, compiled):
        for _ in range(2):  # the second step uses the advanced noise counter
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), labels).backward()
    for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
        assert torch.equal(a.grad, b.grad), name
    counters = [int(m.noise_counter) for m in compiled_model.modules() if hasattr(m, "noise_counter")]
    assert counters and set(counters) == {2}


def test_cifar_resnet38_and_transformer_lm_have_no_graph_breaks():
    torch.manual_seed(0)
    resnet = fracfx.transform(build_model("cifar_resnet38", in_channels=3), CONFIG).train()
    graphs, breaks, reasons = _breaks(resnet, torch.randn(4, 3, 32, 32))
    assert (graphs, breaks) == (1, 0), reasons
    idx = torch.randint(0, 29, (2, 12))
    lm = fracfx.transform(transformer_lm(vocab_size=29, d_model=32, n_layers=2, n_heads=4, context=16), CONFIG, example_inputs=idx).train()
    graphs, breaks, reasons = _breaks(lm, idx)
    assert (graphs, breaks) == (1, 0), reasons


# --- what torch.compile traces for the quantizers (fracfx.nn.quant.compile_mode) ---------------


class _ResidualNet(torch.nn.Module):
    """conv-BN-ReLU, then two residual blocks (BN + shortcut + ReLU): the pattern of the CIFAR ResNets."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(8, 8, 3, padding=1, bias=False) for _ in range(2))
        self.bns = torch.nn.ModuleList(torch.nn.BatchNorm2d(8) for _ in range(2))
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        for conv, bn in zip(self.convs, self.bns):
            x = torch.relu(bn(conv(x)) + x)
        return self.fc(x.mean((2, 3)))


def _recording_backend(graphs, decompose=False):
    """AOTAutograd with inductor's partitioner (min-cut) and, with `decompose`, its decompositions; the
    graphs are kept and run as plain aten ops (no code generation)."""
    import functools

    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)

        return compiler

    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"), decompositions=select_decomp_table() if decompose else {},
                        partition_fn=functools.partial(min_cut_rematerialization_partition, compiler="inductor"))


def _fracfx_ops(gm):
    return sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("fracfx.")})


def _saved_bool_masks(forward):
    """Boolean tensors the forward graph saves for the backward (outputs after the user-visible ones)."""
    outputs = next(n for n in forward.graph.nodes if n.op == "output").args[0]
    return [o for o in outputs if isinstance(o, torch.fx.Node) and getattr(o.meta.get("val"), "dtype", None) == torch.bool]


@pytest.mark.parametrize("mode", quant.COMPILE_MODES)
def test_every_compile_mode_computes_the_eager_step_and_traces_its_form(monkeypatch, mode):
    """Two training steps through AOTAutograd + inductor's partitioner (no code generation) equal eager,
    gradients and noise counters bit for bit; the graphs hold the form the mode names."""
    import copy

    monkeypatch.setattr(quant, "compile_mode", mode)
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = fracfx.transform(_ResidualNet(), CONFIG).train()
    compiled_model = copy.deepcopy(eager)
    graphs = {}
    compiled = torch.compile(compiled_model, backend=_recording_backend(graphs))
    x, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    for model in (eager, compiled):
        for _ in range(2):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), labels).backward()
    for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
        assert torch.equal(a.grad, b.grad), name
    for a, b in zip(eager.buffers(), compiled_model.buffers()):
        assert torch.equal(a, b)
    forward, backward = _fracfx_ops(graphs["forward"]), _fracfx_ops(graphs["backward"])
    if mode == "ops":
        assert {"fracfx.minmax.default", "fracfx.fake_quant.default"} <= set(forward)
        assert {"fracfx.minmax.default", "fracfx.fake_quant.default"} <= set(backward)
    else:  # ranges and deterministic fake quant are tensor formulas inductor can fuse
        assert forward == ["fracfx.counter_snapshot.default"]
        assert backward == (["fracfx.fake_quant.default"] if mode == "fuse" else ["fracfx.rounding_noise.default"])


@pytest.mark.parametrize("mode", ["fuse", "formula"])
def test_compiled_quantized_graph_saves_no_more_relu_masks_than_fp32(monkeypatch, mode):
    """The activation quantizers' backward reads x (exactly), so with inductor's decompositions and
    partitioner the ReLU masks are recomputed from x, as in the FP32 graph, instead of being saved as
    bool tensors, which inductor's CPU code stores and loads slowly (docs/kernels.md)."""
    monkeypatch.setattr(quant, "compile_mode", mode)
    x = torch.randn(4, 3, 8, 8)
    counts = []
    for model in (_ResidualNet(), fracfx.transform(_ResidualNet(), CONFIG)):
        torch._dynamo.reset()
        graphs = {}
        torch.compile(model.train(), backend=_recording_backend(graphs, decompose=True))(x).sum().backward()
        counts.append(len(_saved_bool_masks(graphs["forward"])))
    assert counts == [1, 1]  # the last ReLU's (its output feeds only the mean before the FP32 classifier)


def test_quantizers_compiled_by_inductor_equal_eager():  # one inductor compile per layout: ~15 s on the 2-core machine
    """Each quantizer alone, compiled by inductor (its default form), against eager: outputs and gradients
    bit for bit, on a contiguous and a channels-last input, over two calls (the noise counter advances)."""
    from fracfx.nn.quantizers import ActQuant, GradQuant, WeightQuant

    torch._dynamo.reset()
    torch.manual_seed(0)

    def build():
        torch.manual_seed(0)
        return torch.nn.ModuleList([ActQuant(8), ActQuant(3, integer_zero_point=True), WeightQuant(4), GradQuant(8, seed=3),
                                    GradQuant(6, stochastic=False)]).train()

    def quantize(quantizers, xs):  # one input per quantizer: each gradient has a single path
        return [q(x) for q, x in zip(quantizers, xs)]

    eager, mods = build(), build()
    compiled = torch.compile(lambda *xs: quantize(mods, xs), fullgraph=True)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        for call in range(2):
            shapes = [(4, 8, 6, 6), (4, 8, 6, 6), (8, 8, 3, 3), (4, 8, 6, 6), (4, 8, 6, 6)]
            xs = [(torch.randn(shape) * 3).contiguous(memory_format=memory_format) for shape in shapes]
            ups = [torch.randn(shape).contiguous(memory_format=memory_format) for shape in shapes]
            xe = [x.clone().requires_grad_() for x in xs]
            xc = [x.clone().requires_grad_() for x in xs]
            want, got = quantize(eager, xe), compiled(*xc)
            torch.autograd.backward(want, ups)
            torch.autograd.backward(got, ups)
            for k, (a, b) in enumerate(zip(want, got)):
                assert torch.equal(a, b), (memory_format, call, k)
            for k, (a, b) in enumerate(zip(xe, xc)):
                assert torch.equal(a.grad, b.grad), (memory_format, call, k)
    assert [int(m.noise_counter) for m in mods if hasattr(m, "noise_counter")] == [4, 4]
