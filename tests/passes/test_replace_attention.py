"""replace_attention and fracfx.nn.attention: same function as nn.MultiheadAttention, opened into quantizable ops."""

import itertools
import operator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fracfx
from fracfx.nn.attention import Attention
from fracfx.errors import UnsupportedGraphError
from fracfx.nn.quantizers import ActQuant, GradQuant, WeightQuant
from fracfx.passes import capture_graph
from fracfx.passes.replace_attention import replace_attention


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    return module


def _masks(kind, n, h, l, s, batched):
    kpm_shape = (n, s) if batched else (s,)
    attn = kpm = None
    if kind in ("bool", "both"):
        attn = torch.rand(l, s) < 0.3
        attn[:, 0] = False  # every query keeps one key: no all -inf rows
    if kind == "float":
        attn = torch.randn(l, s)
    if kind == "3d":
        attn = torch.randn(n * h if batched else h, l, s)
    if kind in ("kpm", "both"):
        kpm = torch.rand(kpm_shape) < 0.3
        kpm[..., 0] = False
    return attn, kpm


MHA_CASES = [  # batch_first, kdim/vdim differ, bias, add_bias_kv, add_zero_attn
    (True, False, True, False, False),
    (False, False, True, False, False),
    (True, True, True, False, False),
    (False, True, False, False, False),
    (True, False, True, True, True),
    (False, False, False, True, False),
]


@pytest.mark.parametrize("batch_first, kv, bias, bias_kv, zero_attn", MHA_CASES)
def test_traceable_attention_equals_nn_multihead_attention(batch_first, kv, bias, bias_kv, zero_attn):
    e, h, n, l, s = 8, 2, 3, 4, 5
    kdim, vdim = (6, 5) if kv else (e, e)
    mha = _randomize(nn.MultiheadAttention(e, h, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero_attn,
                                           kdim=kdim, vdim=vdim, batch_first=batch_first)).eval()
    attn = Attention.from_module(mha).eval()
    assert attn.out_proj is mha.out_proj and list(attn.state_dict()) == list(mha.state_dict())
    assert all(a is b for a, b in zip(attn.parameters(), mha.parameters()))
    for batched, masks, need, average in itertools.product((True, False), ("none", "bool", "float", "3d", "kpm", "both"), (False, True), (True, False)):
        def shape(length, dim):
            if not batched:
                return (length, dim)
            return (n, length, dim) if batch_first else (length, n, dim)
        q, k, v = torch.randn(shape(l, e)), torch.randn(shape(s, kdim)), torch.randn(shape(s, vdim))
        attn_mask, kpm = _masks(masks, n, h, l, s, batched)
        kwargs = dict(key_padding_mask=kpm, need_weights=need, attn_mask=attn_mask, average_attn_weights=average)
        ref, ref_w = mha(q, k, v, **kwargs)
        out, out_w = attn(q, k, v, **kwargs)
        case = (batched, masks, need, average)
        assert out.shape == ref.shape and _rel(out, ref) < 1e-5, case
        if need:
            assert out_w.shape == ref_w.shape and (out_w - ref_w).abs().max() < 1e-6, case
        else:
            assert out_w is None and ref_w is None


class SelfAttend(nn.Module):
    """ViT-style use: positional call, need_weights=False, tuple unpacking; plus a returned weights output."""

    def __init__(self, batch_first=True, dropout=0.0):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, dropout=dropout, batch_first=batch_first)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        y, _ = self.mha(x, x, x, need_weights=False)
        _, w = self.mha(x, y, y, average_attn_weights=False)  # cross attention, per-head weights
        return self.fc(y), w


def _ops(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


@pytest.mark.parametrize("batch_first", [True, False])
def test_pass_opens_attention_into_linears_and_matmuls_with_the_same_parameters(batch_first):
    model = _randomize(SelfAttend(batch_first)).eval()
    gm = capture_graph(model)
    assert any(n.op == "call_module" and n.target == "mha" for n in gm.graph.nodes)
    out = replace_attention(gm)
    assert not any(n.op == "call_module" and n.target == "mha" for n in out.graph.nodes)
    # two calls: Q, K, V and output projections each, QK^T and AV each
    assert len(_ops(out, F.linear)) == 8 and len(_ops(out, torch.matmul)) == 4
    assert out.state_dict().keys() == gm.state_dict().keys()
    assert all(out.get_parameter(name) is p for name, p in gm.named_parameters())
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    (ref, ref_w), (got, got_w) = model(x), out(x)
    assert _rel(got, ref) < 1e-5 and got_w.shape == ref_w.shape == (2, 4, 5, 5) and _rel(got_w, ref_w) < 1e-5
    # gradients reach the (shared) parameters and agree with nn.MultiheadAttention's
    got.square().sum().backward()
    ref.square().sum().backward()
    for name in ("mha.in_proj_weight", "mha.out_proj.weight"):
        assert _rel(gm.get_parameter(name).grad, model.get_parameter(name).grad) < 1e-4, name


def test_pass_is_pure_and_names_nodes_by_the_attention_module():
    model = SelfAttend()
    gm = capture_graph(model)
    code, state = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    out = replace_attention(gm)
    assert out is not gm and gm.code == code and isinstance(gm.get_submodule("mha"), nn.MultiheadAttention)
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())
    paths = {list(n.meta["nn_module_stack"])[-1] for n in _ops(out, F.linear) + _ops(out, torch.matmul)}
    assert paths == {"mha"}


def test_attention_dropout_follows_train_and_eval():
    model = SelfAttend(dropout=0.5)
    gm = replace_attention(capture_graph(model))
    drops = [m for name, m in gm.named_modules() if name == "mha.dropout"]
    assert len(drops) == 1 and isinstance(drops[0], nn.Dropout) and drops[0].p == 0.5
    x = torch.randn(2, 5, 16)
    gm.train()
    assert not torch.equal(gm(x)[0], gm(x)[0])  # dropout is live in training
    gm.eval(), model.eval()
    assert torch.equal(gm(x)[0], gm(x)[0]) and _rel(gm(x)[0], model(x)[0]) < 1e-5


class Encoder(nn.Module):
    def __init__(self, batch_first, norm_first):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=batch_first, norm_first=norm_first, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=False)
        nn.init.normal_(self.encoder.norm.weight)  # not the identity on an already normalised output
        self.layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=batch_first, norm_first=norm_first)
        self.fc = nn.Linear(16, 3)

    def forward(self, x, mask, padding):
        return self.fc(self.layer(self.encoder(x, mask=mask, src_key_padding_mask=padding), src_mask=mask))


@pytest.mark.parametrize("batch_first, norm_first", [(True, False), (False, True)])
def test_transformer_encoder_layers_are_opened_and_equal_to_pytorch(batch_first, norm_first):
    model = Encoder(batch_first, norm_first).eval()
    x = torch.randn(2, 6, 16) if batch_first else torch.randn(6, 2, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(6)
    padding = torch.zeros(2, 6)
    padding[1, -2:] = float("-inf")
    inputs = (x, mask, padding)
    gm = fracfx.transform(model, example_inputs=inputs)
    opaque = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)
    assert not any(isinstance(m, opaque) for m in gm.modules())
    rows = fracfx.cost_report(gm).rows
    # per layer (3): Q, K, V, out projections + linear1, linear2, and the two attention matmuls
    assert sum(r.kind == "linear" for r in rows) == 3 * 6 + 1 and sum(r.kind == "matmul" for r in rows) == 3 * 2
    assert all(r.act_bits == 8 for r in rows if r.module_path != "fc")
    assert [r.node for r in fracfx.fp32_report(gm)] == ["fc"]
    fracfx.set_bits(gm, 0, 0, 0)
    gm.eval()
    assert _rel(gm(*inputs), model(*inputs)) < 1e-5
    with torch.no_grad():  # PyTorch's fused fast path
        assert _rel(gm(*inputs), model(*inputs)) < 1e-5


def test_modules_named_in_keep_stay_opaque_and_are_reported():
    model = SelfAttend()
    out = replace_attention(capture_graph(model), keep=("mha",))
    assert isinstance(out.get_submodule("mha"), nn.MultiheadAttention)
    gm = fracfx.transform(model, fracfx.QuantConfig(replace_attention=False))
    assert {r.op for r in fracfx.fp32_report(gm)} >= {"MultiheadAttention"}


def test_traced_flag_raises_a_clear_error():
    class Flagged(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2)

        def forward(self, x, need):
            return self.mha(x, x, x, need_weights=need)[0]

    with pytest.raises(UnsupportedGraphError, match="need_weights.*concrete_args"):
        replace_attention(capture_graph(Flagged()))


@pytest.fixture(scope="module")
def vit_b_16():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=32).eval()  # 32x32 with 16x16 patches: 4 patches + class token
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head: outputs would all be 0
    x = torch.randn(2, 3, 32, 32)
    return model, x, fracfx.transform(model, example_inputs=x)


def test_vit_b_16_attention_is_quantized_and_exact_when_disabled(vit_b_16):
    model, x, gm = vit_b_16
    rows = [r for r in fracfx.cost_report(gm).rows if r.module_path.endswith("self_attention")]
    assert len(rows) == 12 * 6  # 12 layers: Q, K, V, out projections, QK^T, AV
    assert sum(r.kind == "matmul" for r in rows) == 24 and all(r.macs > 0 for r in rows)
    assert all((r.act_bits, r.weight_bits, r.grad_bits) == (8, 8, 8) for r in rows)
    # quant nodes around each matmul: both operands through ActQuant, the result through GradQuant
    matmuls = [n for n in gm.graph.nodes if n.target is torch.matmul]
    assert len(matmuls) == 24
    for node in matmuls:
        assert all(isinstance(gm.get_submodule(a.target), ActQuant) for a in node.args[:2])
        assert [type(gm.get_submodule(u.target)) for u in node.users] == [GradQuant]
    projections = [n for n in gm.graph.nodes if n.target is F.linear and list(n.meta["nn_module_stack"])[-1].endswith("self_attention")]
    assert len(projections) == 48
    for node in projections:  # x -> ActQuant, W -> WeightQuant, y -> GradQuant
        kinds = [type(gm.get_submodule(a.target)) for a in node.args[:2]]
        assert kinds == [ActQuant, WeightQuant] and [type(gm.get_submodule(u.target)) for u in node.users] == [GradQuant]
    assert not [r for r in fracfx.fp32_report(gm) if "attention" in r.module_path or r.op == "MultiheadAttention"]
    fracfx.set_bits(gm, 0, 0, 0)
    gm.eval()
    with torch.no_grad():
        assert _rel(gm(x), model(x)) < 1e-5


def test_getitem_users_and_whole_tuple_uses_are_rewired():
    class Whole(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            pair = self.mha(x, x, x)
            return pair

    model = _randomize(Whole()).eval()
    out = replace_attention(capture_graph(model))
    assert not [n for n in out.graph.nodes if n.target is operator.getitem and n.args[0].op == "call_module"]
    x = torch.randn(2, 3, 8)
    (a, wa), (b, wb) = model(x), out(x)
    assert _rel(b, a) < 1e-5 and _rel(wb, wa) < 1e-5


def test_traceable_attention_module_is_quantized_without_the_pass():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention(16, 4, dropout=0.1, batch_first=True)
            self.fc = nn.Linear(16, 2)

        def forward(self, x, mask):
            return self.fc(self.attn(x, x, x, attn_mask=mask, need_weights=False)[0])

    model = Net().eval()
    x, mask = torch.randn(2, 5, 16), torch.rand(5, 5) < 0.3
    mask[:, 0] = False
    gm = fracfx.transform(model, fracfx.QuantConfig(keep_fp32=(), replace_attention=False), example_inputs=(x, mask))
    rows = fracfx.cost_report(gm).rows
    assert [(r.module_path, r.kind) for r in rows] == [("attn", "linear")] * 3 + [("attn", "matmul")] * 2 + [("attn", "linear"), ("fc", "linear")]
    assert fracfx.fp32_report(gm) == []  # the mask helper is not a compute op
    fracfx.set_bits(gm, 0, 0, 0)
    gm.eval()
    assert torch.equal(gm(x, mask), model(x, mask))
