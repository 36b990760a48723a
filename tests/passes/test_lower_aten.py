"""lower_aten and the torch.export capture path, on small pure-PyTorch models (no transformers):
op counts after the pass, bits 0 equal to the float model, keyword inputs, dict outputs, the
train/eval switch, ExportedProgram input, and one error when neither capture path works."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fracfx
from fracfx.errors import UnsupportedGraphError
from fracfx.meta import CAPTURED, MATMUL, compute_nodes, get_quant_spec
from fracfx.nn.exported import ModeBatchNorm
from fracfx.passes import capture_graph, lower_aten
from fracfx.passes.infra import run_pipeline, step

aten = torch.ops.aten


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 projection: addmm on a (in, out) weight over the flattened tokens."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.weight.size(-1),))


class Attention(nn.Module):
    def __init__(self, width=16, heads=2):
        super().__init__()
        self.heads, self.qkv, self.proj, self.drop = heads, Conv1D(width, 3 * width), Conv1D(width, width), nn.Dropout(0.1)

    def forward(self, x, mask=None):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=0.1 if self.training else 0.0)
        return self.drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.ln, self.attn = nn.LayerNorm(width), Attention(width)
        self.ln2, self.fc = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x, mask=None):
        x = x + self.attn(self.ln(x), mask)
        return x + self.fc(self.ln2(x))


class TinyLM(nn.Module):
    """Keyword inputs, a config-dependent branch fx cannot trace, a dict output."""

    def __init__(self, vocab=20, width=16):
        super().__init__()
        self.embed, self.blocks, self.head = nn.Embedding(vocab, width), nn.ModuleList([Block(width), Block(width)]), nn.Linear(width, vocab)

    def forward(self, *, input_ids, return_dict=True):
        x = self.embed(input_ids)
        if input_ids.shape[1] > 1:  # control flow on an input's shape: fx cannot trace it
            for block in self.blocks:
                x = block(x)
        logits = self.head(x)
        return {"logits": logits} if return_dict else logits


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.drop, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.bn(self.conv(x)))).mean((2, 3)))


IDS = {"input_ids": torch.randint(0, 20, (2, 6))}
FP32 = fracfx.QuantConfig(act_bits=0, weight_bits=0, grad_bits=0, keep_fp32=())


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_rewrites_addmm_attention_dropout_and_batch_norm():
    torch.manual_seed(0)
    gm = run_pipeline(TinyLM(), [step(capture_graph, mode="export", example_kwargs=IDS), step(lower_aten)])
    assert gm.meta[CAPTURED] == "export"
    targets = _targets(gm)
    assert aten.addmm.default not in targets and aten.scaled_dot_product_attention.default not in targets
    assert targets.count(aten.linear.default) == 2 * 3 + 1 and targets.count(torch.matmul) == 2 * 2
    assert not any(n.op == "call_module" and n.target == "_guards_fn" for n in gm.graph.nodes)
    dropouts = [m for m in gm.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 2 * 2 and all(m.p == 0.1 for m in dropouts)  # the residual dropouts and the attention's
    bn = lower_aten(capture_graph(ConvBN(), mode="export", example_args=(torch.randn(2, 3, 6, 6),)))
    assert [type(m) for m in bn.modules()].count(ModeBatchNorm) == 1 and aten.dropout.default not in _targets(bn)


def test_bits_zero_equal_the_float_model_with_keyword_inputs_and_dict_output():
    torch.manual_seed(0)
    model = TinyLM().eval()
    qm = fracfx.transform(model, FP32, example_inputs=IDS)  # "auto": fx fails on the root, export captures
    assert qm.meta[CAPTURED] == "export"
    qm.eval()
    out, ref = qm(**IDS), model(**IDS)
    assert isinstance(out, dict) and out.keys() == {"logits"}
    assert torch.equal(out["logits"], ref["logits"])  # the decomposed attention hands back the fused SDPA at bits 0
    assert fracfx.cost_report(qm).macs > 0


def test_every_projection_and_attention_product_is_quantized_with_module_paths():
    qm = fracfx.transform(TinyLM(), fracfx.QuantConfig(keep_fp32=("blocks.1.*",)), example_inputs=IDS)
    specs = [get_quant_spec(n) for n in compute_nodes(qm.graph)]
    quantized = {(s.module_path, s.kind) for s in specs if s.quantize}
    assert ("blocks.0.attn.qkv", "linear") in quantized and ("blocks.0.attn", MATMUL) in quantized
    kept = {s.module_path: s.reason for s in specs if not s.quantize}
    assert kept["head"] == "@last kept FP32" if "head" in kept else True
    assert kept["blocks.1.attn.qkv"] == "keep_fp32 glob 'blocks.1.*'"
    assert {r.module_path for r in fracfx.fp32_report(qm)} >= {"blocks.1.attn", "blocks.1.fc"}
    out = qm(**IDS)["logits"]
    out.pow(2).mean().backward()
    grads = [p.grad for p in qm.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_dfq_gates_each_transformer_block_of_an_exported_graph():
    dm = fracfx.transform(TinyLM(), fracfx.DFQConfig(), example_inputs=IDS)
    from fracfx.meta import get_block
    assert {get_block(n).module_path for n in compute_nodes(dm.graph) if get_block(n)} == {"blocks.0", "blocks.1"}
    dfq = fracfx.runtime.DFQController(dm, target_ratio=3.0)
    loss = dm(**IDS)["logits"].pow(2).mean() + dfq.cost_loss()
    loss.backward()
    assert math.isfinite(loss.item())


def test_train_and_eval_switch_batch_norm_and_dropout_again():
    torch.manual_seed(0)
    model, x = ConvBN(), torch.randn(4, 3, 6, 6)
    qm = fracfx.transform(model, FP32.replace(capture="export"), example_inputs=x)
    qm.train(), model.train()
    torch.manual_seed(1); a = qm(x)
    torch.manual_seed(1); b = model(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(qm.get_buffer("bn.running_mean"), model.bn.running_mean, rtol=0, atol=0)
    qm.eval(), model.eval()
    assert torch.equal(qm(x), model(x))


def test_accepts_an_exported_program_and_its_module():
    model, x = ConvBN().eval(), torch.randn(2, 3, 6, 6)
    program = torch.export.export(model, (x,), strict=False)
    for given in (program, program.module()):
        qm = fracfx.transform(given, FP32, example_inputs=x).eval()
        assert qm.meta[CAPTURED] == "export" and torch.equal(qm(x), model(x))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # neither fx nor torch.export can decide this from shapes
            return self.fc(x)
        return x


def test_one_error_names_both_failures_and_nothing_is_returned():
    with pytest.raises(UnsupportedGraphError, match="(?s)torch.fx could not trace.*test_lower_aten.py:.*torch.export could not capture DataDependent.*fix"):
        fracfx.transform(DataDependent(), example_inputs=torch.randn(2, 4))
    with pytest.raises(UnsupportedGraphError, match="(?s)torch.fx could not trace.*torch.export needs example inputs"):
        fracfx.transform(TinyLM())
    with pytest.raises(UnsupportedGraphError, match="torch.fx could not trace"):
        fracfx.transform(TinyLM(), FP32.replace(capture="fx"), example_inputs=IDS)


class HeadDropout(nn.Module):
    """timm's GhostNet head: F.dropout(training=self.training) in the root forward, which fx bakes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.dropout(x, p=0.5, training=self.training))


def test_functional_dropout_in_a_symbolic_graph_switches_with_eval():
    model, x = HeadDropout(), torch.randn(8, 4)
    gm = lower_aten(capture_graph(model))  # traced in train mode: training=True baked
    assert F.dropout not in _targets(gm) and [type(m) for m in gm.modules()].count(nn.Dropout) == 1
    gm.eval(), model.eval()
    assert torch.equal(gm(x), model(x))
    gm.train()
    assert (gm.get_submodule("fracfx_lowered.dropout")(torch.ones(100)) == 0).any()
