"""torch.compile(model) of a transformed model: one graph, no breaks, and the same training numbers.

The quantizers' kernels are custom ops with fake implementations and the rounding noise is a pure
function of tensors and ints (no torch.Generator), so dynamo traces the quantizers whole.
"""

import torch

import fracfx
from fracfx.models import build_model
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
