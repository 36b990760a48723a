"""Hugging Face models end to end, built from small configs (no weights are downloaded):
GPT-2 (Conv1D projections = addmm), BERT and ViT go through fracfx.transform (torch.export
capture, since torch.fx cannot trace their root forward); bits 0 equal the float model, 8/8/8
and DFQ training steps give finite gradients. Skipped without the `hf` extra."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[test,hf]'")

import fracfx  # noqa: E402
from fracfx.meta import CAPTURED, compute_nodes, get_block, get_quant_spec  # noqa: E402

transformers.logging.set_verbosity_error()
FP32 = fracfx.QuantConfig(act_bits=0, weight_bits=0, grad_bits=0, keep_fp32=())


def gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16, use_cache=False,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config), {"input_ids": torch.randint(0, 64, (2, 8))}, "logits"


def bert():
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=64, max_position_embeddings=16)
    inputs = {"input_ids": torch.randint(0, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    return transformers.BertForSequenceClassification(config), inputs, "logits"


def vit():
    config = transformers.ViTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                    image_size=16, patch_size=4, num_labels=3)
    return transformers.ViTForImageClassification(config), {"pixel_values": torch.randn(2, 3, 16, 16)}, "logits"


MODELS = {"gpt2": gpt2, "bert": bert, "vit": vit}


def _finite_grads(model) -> bool:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(grads) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", MODELS)
def test_bits_zero_equal_the_float_model_at_any_batch(name):
    torch.manual_seed(0)
    model, inputs, key = MODELS[name]()
    model.eval()
    qm = fracfx.transform(model, FP32, example_inputs=inputs).eval()
    assert qm.meta[CAPTURED] == "export"
    out, ref = qm(**inputs), model(**inputs)
    assert type(out) is type(ref)  # the model's own output dataclass
    assert torch.equal(getattr(out, key), getattr(ref, key))  # bit-exact: at bits 0 the lowered attention runs the fused SDPA
    five = {k: torch.cat([v, v, v])[:5] for k, v in inputs.items()}  # captured at batch 2, the batch stays dynamic
    out, ref = getattr(qm(**five), key), getattr(model(**five), key)
    assert out.shape[0] == 5
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", MODELS)
def test_static_8_bit_training_step_quantizes_every_projection(name):
    torch.manual_seed(0)
    model, inputs, key = MODELS[name]()
    qm = fracfx.transform(model, fracfx.QuantConfig(), example_inputs=inputs)
    specs = [get_quant_spec(n) for n in compute_nodes(qm.graph)]
    assert sum(s.quantize for s in specs) >= 2 * 6  # q, k, v (or c_attn), QK^T, AV, out, two MLP per layer
    assert [s.reason for s in specs if not s.quantize] == ["@last kept FP32"]
    getattr(qm(**inputs), key).float().pow(2).mean().backward()
    assert _finite_grads(qm)
    assert fracfx.cost_report(qm).macs > 0


def test_gpt2_conv1d_projections_are_quantized_linears():
    model, inputs, _ = gpt2()
    qm = fracfx.transform(model, fracfx.QuantConfig(), example_inputs=inputs)
    paths = {get_quant_spec(n).module_path: get_quant_spec(n) for n in compute_nodes(qm.graph)}
    for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        assert paths[f"transformer.h.0.{part}"].kind == "linear" and paths[f"transformer.h.0.{part}"].quantize


@pytest.mark.parametrize("name", MODELS)
def test_dfq_gates_every_transformer_layer_and_trains(name):
    torch.manual_seed(0)
    model, inputs, key = MODELS[name]()
    dm = fracfx.transform(model, fracfx.DFQConfig(), example_inputs=inputs)
    blocks = {get_block(n).module_type for n in compute_nodes(dm.graph) if get_block(n) is not None}
    assert len({get_block(n).index for n in compute_nodes(dm.graph) if get_block(n) is not None}) >= 2, blocks
    dfq = fracfx.runtime.DFQController(dm, target_ratio=3.0)
    loss = getattr(dm(**inputs), key).float().pow(2).mean() + dfq.cost_loss()
    loss.backward()
    assert math.isfinite(loss.item()) and _finite_grads(dm)


@pytest.mark.parametrize("name", MODELS)
def test_exports_to_onnx_and_verifies_at_both_levels(name, tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model, inputs, key = MODELS[name]()
    qm = fracfx.transform(model, fracfx.QuantConfig(), example_inputs=inputs)
    qm.train()
    with torch.no_grad():
        for _ in range(3):
            qm(**inputs)
    qm.eval()
    report = fracfx.export_onnx(qm, tmp_path / "m.onnx", inputs, format="int8", verify=True)  # 64 seeded inputs, batch 64
    assert report.verify.ok, report.lines()
    assert all(level.top1_agreement >= 0.999 for level in report.verify.levels)

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(inputs) and session.get_outputs()[0].name == key
    seven = {k: torch.cat([v] * 4)[:7] for k, v in inputs.items()}
    got = session.run(None, {k: v.numpy() for k, v in seven.items()})[0]
    with torch.no_grad():
        want = getattr(fracfx.freeze(qm)(**seven), key).numpy()
    assert got.shape == want.shape and (got.argmax(-1) == want.argmax(-1)).mean() >= 0.999
