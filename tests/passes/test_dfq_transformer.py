"""DFQ on transformers: token-layout gates, block detection, per-sample attention matmuls, cost."""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fracfx
from tests.passes.conftest import force
from fracfx.config import CIFAR_CANDIDATES, IMAGENET_CANDIDATES
from fracfx.nn.mixed import MixedActQuant, MixedGradQuant
from fracfx.errors import ConfigError, UnsupportedGraphError
from fracfx.nn.gates import GateChoice, GateEmbedding, TokenGateEmbedding
from fracfx.meta import get_binding, get_block, get_block_ports, get_quant_spec
from fracfx.models.cifar_resnet import cifar_resnet20
from fracfx.models.transformer_lm import transformer_lm

VOCAB, D_MODEL, HEADS, CONTEXT = 50, 32, 4, 16
VIT_TOKENS, VIT_WIDTH, VIT_MLP = 5, 768, 3072  # vit_b_16 at 32x32: 2x2 patches + the class token


def lm_ids(batch, length=CONTEXT):
    return torch.randint(0, VOCAB, (batch, length))


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = transformer_lm(vocab_size=VOCAB, d_model=D_MODEL, n_layers=2, n_heads=HEADS, context=CONTEXT)
    # "@last" only: the default "@first" would keep blocks.0.attn.query in FP32 (a CNN's stem rule)
    config = fracfx.DFQConfig(keep_fp32=("@last",))
    return model, fracfx.transform(model, config, example_inputs=lm_ids(2)), config


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=32, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zeroes it: all logits would be 0
    config = fracfx.DFQConfig(weight_bits=6, candidates=IMAGENET_CANDIDATES)
    return model, fracfx.transform(model, config, example_inputs=torch.randn(2, 3, 32, 32)), config


def vit_images(batch):
    return torch.randn(batch, 3, 32, 32) * torch.linspace(0.5, 2.0, batch).view(batch, 1, 1, 1)


def blocks(gm):
    """[(module path, per-sample input shape, residual)] in gate order."""
    specs = sorted({p.block for n in gm.graph.nodes for p in get_block_ports(n)}, key=lambda s: s.index)
    return [(s.module_path, s.input_shape, s.residual) for s in specs]


def gate_choices(gm):
    return [m for m in gm.modules() if isinstance(m, GateChoice)]




@contextlib.contextmanager
def prescribed_choices(gm, pattern):
    """Every gate's mask becomes one_hot(pattern(block, batch)): diverse choices on purpose."""
    def hook(block):
        return lambda module, args, mask: F.one_hot(pattern(block, mask.shape[0]), mask.shape[1]).to(mask.dtype)
    handles = [m.register_forward_hook(hook(b)) for b, m in enumerate(gate_choices(gm))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def rotating(block, batch):
    """Sample i of block b picks candidate (i + b) mod K (K = 4 or 5 here)."""
    return (torch.arange(batch) + block) % 4


def static_twin(model, gm, config, example):
    """The static-precision model with gm's weights and running ranges."""
    static = fracfx.transform(model, fracfx.QuantConfig(weight_bits=config.weight_bits, keep_fp32=config.keep_fp32), example_inputs=example)
    static.load_state_dict(gm.state_dict(), strict=False)
    return static


def block_of(path, block_paths):
    (found,) = [b for b in block_paths if path == b or path.startswith(b + ".")]
    return found


def set_block_bits(static, bits_of_block):
    """Set every quantized op's act and grad bits to its block's (a, g)."""
    for node in static.graph.nodes:
        binding = get_binding(node)
        if binding is None:
            continue
        a, g = bits_of_block[block_of(get_quant_spec(node).module_path, bits_of_block)]
        for target in binding.act:
            static.get_submodule(target).set_bits(a)
        static.get_submodule(binding.grad).set_bits(g)
    return static


def gated_ops(gm):
    """{block path: [(kind, binding, block index)]} of the quantized ops in each gated block."""
    found = {}
    for node in gm.graph.nodes:
        spec, binding = get_block(node), get_binding(node)
        if spec is not None and binding is not None:
            found.setdefault(spec.module_path, []).append((get_quant_spec(node).kind, binding, spec.index))
    return found


# --- block detection and gate wiring ------------------------------------------------------------


def test_transformer_lm_gates_each_sublayer_or_whole_layers(lm):
    model, gm, _ = lm
    paths = [f"blocks.{i}.{part}" for i in (0, 1) for part in ("attn", "ff")]
    assert blocks(gm) == [(p, (CONTEXT, D_MODEL), True) for p in paths]
    ops = gated_ops(gm)
    kinds = {path: sorted(kind for kind, _, _ in ops[path]) for path in paths}
    assert kinds["blocks.0.attn"] == ["linear"] * 4 + ["matmul"] * 2  # Q, K, V, proj, QK^T, AV
    assert kinds["blocks.1.ff"] == ["linear"] * 2
    # every quantizer of every gated op, both matmul operands included, takes its own block's mask
    masks = {get_block(n).index: n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), GateChoice)}
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for path in paths:
        for kind, binding, index in ops[path]:
            assert len(binding.act) == (2 if kind == "matmul" else 1)
            for target in binding.act + (binding.grad,):
                assert isinstance(gm.get_submodule(target), (MixedActQuant, MixedGradQuant))
                assert nodes[target].args[1] is masks[index]
    embed = gm.get_submodule("fracfx_gate.embed.0")
    assert type(embed) is TokenGateEmbedding and embed.layers[0].in_features == D_MODEL
    whole = fracfx.transform(model, fracfx.DFQConfig(block_types=("Block",), candidates=((4, 8), "skip")), example_inputs=lm_ids(2))
    assert blocks(whole) == [(f"blocks.{i}", (CONTEXT, D_MODEL), True) for i in (0, 1)]  # a chain of two residual adds


def test_vit_b_16_gates_one_encoder_block_per_layer(vit):
    _, gm, _ = vit
    paths = [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
    assert blocks(gm) == [(p, (VIT_TOKENS, VIT_WIDTH), True) for p in paths]
    ops = gated_ops(gm)
    # attention (replaced by traceable ops) and MLP of a layer share one decision
    assert sorted(kind for kind, _, _ in ops[paths[3]]) == ["linear"] * 6 + ["matmul"] * 2
    assert {type(m) for n, m in gm.named_modules() if n.startswith("fracfx_gate.embed.") and n.count(".") == 2} == {TokenGateEmbedding}
    outside = [get_quant_spec(n).module_path for n in gm.graph.nodes if get_binding(n) is not None and get_block(n) is None]
    assert outside == []  # conv_proj ("@first") and heads.head ("@last") stay FP32, all else is gated


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-ln", "post-ln"])
def test_torch_encoder_layers_are_blocks_and_a_misplaced_batch_is_refused(norm_first):
    def model(batch_first):
        layer = lambda: nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
        return nn.Sequential(nn.Linear(8, 32), layer(), layer(), nn.Linear(32, 3))

    gm = fracfx.transform(model(True), fracfx.DFQConfig(), example_inputs=torch.randn(2, 7, 8))
    assert blocks(gm) == [("1", (7, 32), True), ("2", (7, 32), True)]
    gm.train()(torch.randn(1, 7, 8)).sum().backward()
    with pytest.raises(UnsupportedGraphError, match=r"dim 0 is not the batch size 7 of example_inputs.*batch_first=True"):
        fracfx.transform(model(False), fracfx.DFQConfig(), example_inputs=torch.randn(7, 2, 8))


# --- the embedding layout -----------------------------------------------------------------------


def test_token_embedding_is_the_mean_over_tokens_then_the_mlp():
    embed = TokenGateEmbedding(6, (5, 3))
    x = torch.randn(4, 7, 6)
    l0, l2 = embed.layers[0], embed.layers[2]
    pooled = x.sum(1) / 7
    expected = F.relu(pooled @ l0.weight.T + l0.bias) @ l2.weight.T + l2.bias
    assert torch.allclose(embed(x), expected, atol=1e-6)
    assert torch.allclose(embed(x.view(4, 7, 1, 6)), expected, atol=1e-6)  # channels last: (B, H, W, C)
    assert embed(x[:1]).shape == (1, 3)


def test_layout_follows_the_blocks_first_op_and_can_be_forced(lm):
    model, _, config = lm
    resnet = fracfx.transform(cifar_resnet20(), fracfx.DFQConfig(), example_inputs=torch.randn(2, 3, 16, 16))
    assert type(resnet.get_submodule("fracfx_gate.embed.0")) is GateEmbedding
    # (B, C, L) maps have the rank of (B, T, C) tokens: the block's first op (a conv) decides
    conv1d = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), Residual1d(8), Residual1d(8), nn.Flatten(), nn.Linear(8 * 10, 2))
    gm = fracfx.transform(conv1d, fracfx.DFQConfig(), example_inputs=torch.randn(2, 3, 10))
    embed = gm.get_submodule("fracfx_gate.embed.0")
    assert type(embed) is GateEmbedding and embed.layers[0].in_channels == 8
    forced = fracfx.transform(model, config.replace(embed_layout="channels_first"), example_inputs=lm_ids(2))
    embed = forced.get_submodule("fracfx_gate.embed.0")
    assert type(embed) is GateEmbedding and embed.layers[0].in_channels == CONTEXT  # as asked: dim 1 read as channels
    with pytest.raises(ConfigError, match="did you mean 'tokens'"):
        fracfx.DFQConfig(embed_layout="token")


class Residual1d(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


# --- numerics: each sample at its own bits ------------------------------------------------------


def _per_sample_exactness(model, gm, config, example, x, candidates):
    with torch.no_grad():
        gm.train()(x)  # running ranges
        with prescribed_choices(gm, rotating):
            out = gm.eval()(x)
    paths = [p for p, _, _ in blocks(gm)]
    static = static_twin(model, gm, config, example).eval()
    for sample in range(len(x)):
        bits = {p: candidates[int(rotating(b, len(x))[sample])] for b, p in enumerate(paths)}
        with torch.no_grad():
            expected = set_block_bits(static, bits)(x)
        assert torch.equal(out[sample], expected[sample]), sample
    # and the bits matter: a static model at one candidate differs for the samples that chose another
    with torch.no_grad():
        uniform = set_block_bits(static, {p: candidates[0] for p in paths})(x)
    assert not torch.equal(out[1], uniform[1])


def test_each_lm_sequence_equals_the_static_model_at_its_own_bits(lm):
    model, gm, config = lm
    _per_sample_exactness(model, gm, config, lm_ids(2), lm_ids(4), CIFAR_CANDIDATES)


def test_each_vit_image_equals_the_static_model_at_its_own_bits(vit):
    model, gm, config = vit
    _per_sample_exactness(model, gm, config, torch.randn(2, 3, 32, 32), vit_images(4), IMAGENET_CANDIDATES)


def test_attention_matmul_gradients_are_quantized_at_each_samples_bits(lm):
    model, _, config = lm
    candidates = ((3, 4), (8, 12))  # 4-bit vs 12-bit gradients: at most 16 levels vs thousands
    gm = fracfx.transform(model, config.replace(candidates=candidates), example_inputs=lm_ids(2))
    seen = {}
    for kind, binding, _ in gated_ops(gm)["blocks.1.attn"]:
        if kind == "matmul":
            quant = gm.get_submodule(binding.grad)
            # the matmul's output y is what GradQuant receives; y.grad is the quantized dL/dY
            def keep(module, args, out, target=binding.grad):
                args[0].register_hook(lambda grad: seen.__setitem__(target, grad))
            quant.register_forward_hook(keep)
    pattern = lambda block, batch: torch.arange(batch) % 2
    with prescribed_choices(gm, pattern):
        out = gm.train()(lm_ids(4))
    (out * torch.randn_like(out)).sum().backward()
    assert len(seen) == 2
    for grad in seen.values():
        assert grad.shape[:2] == (4, HEADS)
        for sample in range(4):
            levels = torch.unique(grad[sample]).numel()
            if sample % 2 == 0:
                assert levels <= 16, levels
            else:
                assert levels > 256, levels


# --- training, cost and batch size 1 -------------------------------------------------------------


@pytest.mark.parametrize("which", ["lm", "vit"])
def test_trains_a_few_steps_with_the_cost_term(which, request):
    model, gm, _ = request.getfixturevalue(which)
    gm.get_submodule("fracfx_gate.head").reset_parameters()  # other tests force choices through it
    controller = fracfx.runtime.DFQController(gm, target_ratio=2.0)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    gate = [p for n, p in gm.named_parameters() if n.startswith("fracfx_gate.")]
    for step in range(3):
        if which == "lm":
            ids = lm_ids(3)
            loss = F.cross_entropy(gm.train()(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        else:
            loss = F.cross_entropy(gm.train()(vit_images(3)), torch.tensor([1, 4, 7]))
        loss = loss + controller.cost_loss()
        optimizer.zero_grad()
        loss.backward()
        assert math.isfinite(loss.item()), step
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate), step
        optimizer.step()
    assert all(sum(u.values()) == 9 for u in controller.usage.values())


def attention_macs(tokens, width):
    return 2 * tokens * tokens * width  # QK^T and AV over all heads


@pytest.mark.parametrize("which", ["lm", "vit"])
def test_cp_of_each_candidate_counts_the_attention_matmuls(which, request):
    model, gm, config = request.getfixturevalue(which)
    if which == "lm":
        t, c, layers, hidden, x = CONTEXT, D_MODEL, 2, 4 * D_MODEL, lm_ids(2)
    else:
        t, c, layers, hidden, x = VIT_TOKENS, VIT_WIDTH, 12, VIT_MLP, vit_images(2)
    linear = layers * (4 * t * c * c + 2 * t * c * hidden)  # Q, K, V, proj; MLP in and out
    matmul = layers * attention_macs(t, c)
    controller = fracfx.runtime.DFQController(gm, target_ratio=3.0)
    assert controller.total_macs == linear + matmul
    w = config.weight_bits
    for index, (a, g) in enumerate(config.candidates):
        force(gm, index)
        gm.train()(x)
        # a linear costs a*w + g*w + a*g; a matmul's second operand is an activation at a bits
        expected = 100 * (linear * (a * w + g * w + a * g) + matmul * (a * a + g * a + a * g)) / (3 * 1024 * (linear + matmul))
        assert controller.cp == pytest.approx(expected, rel=1e-6), index  # the controller sums in FP32


def test_without_quantized_matmuls_cp_is_the_fractrain_table(lm):
    model, _, config = lm
    gm = fracfx.transform(model, config.replace(quantize=("linear",)), example_inputs=lm_ids(2))
    controller = fracfx.runtime.DFQController(gm, target_ratio=3.0)
    for index, expected in enumerate([1.758, 2.083, 2.604, 3.385, 4.688]):
        force(gm, index)
        gm.train()(lm_ids(3))
        assert controller.cp == pytest.approx(expected, abs=5e-4), index


def test_batch_size_one_matches_the_static_model_in_training(lm):
    model, gm, config = lm
    force(gm, None)  # a tie everywhere: the first candidate, (3, 6)
    static = set_block_bits(static_twin(model, gm, config, lm_ids(2)), {p: (3, 6) for p, _, _ in blocks(gm)})
    ids = lm_ids(1)
    out, expected = gm.train()(ids), static.train()(ids)
    assert torch.equal(out, expected)
    assert all(m.last_choice.tolist() == [0] for m in gate_choices(gm))
    upstream = torch.randn_like(out)
    gm.zero_grad(set_to_none=True)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    # same rounding-generator states, same 6-bit grids (one sample: its group is the batch)
    for name, param in static.named_parameters():
        assert torch.equal(gm.get_parameter(name).grad, param.grad), name


def test_vit_runs_at_batch_size_one(vit):
    _, gm, _ = vit
    controller = fracfx.runtime.DFQController(gm, target_ratio=3.0)
    out = gm.train()(vit_images(1))
    (out.sum() + controller.cost_loss()).backward()
    assert gm.get_submodule("fracfx_gate.embed.11.layers.0").weight.grad is not None
    assert gm.eval()(vit_images(1)).shape == (1, 10)


# --- the "fp32" and "skip" candidates on transformer blocks -------------------------------------


def test_fp32_and_skip_candidates_on_transformer_layers(lm):
    model, _, _ = lm
    config = fracfx.DFQConfig(keep_fp32=("@last",), candidates=((4, 8), "fp32", "skip"), block_types=("Block",))
    gm = fracfx.transform(model, config, example_inputs=lm_ids(2))
    ids = lm_ids(3)
    force(gm, 1)
    with torch.no_grad():
        assert torch.equal(gm.train()(ids), model.train()(ids))
        force(gm, 2)  # every layer skipped: the embeddings go straight to the final norm
        x = model.tok_emb(ids) + model.pos_emb(torch.arange(CONTEXT))
        assert torch.equal(gm.eval()(ids), model.head(model.ln_f(x)))
