"""A sweep over timm models across families (slow; skipped without the `timm` extra).

For each model, as in the torchvision sweep: fracfx.transform succeeds WITHOUT trace_fallback;
with quantization disabled the eval output is bit-exact to the original model; at 8/8/8 in train
mode a forward + backward gives finite gradients; every conv/linear module is quantized or listed
by fracfx.fp32_report with a reason. Inputs are small (batch 2) to keep the sweep within minutes.
Set FRACFX_TEST_THREADS to choose torch's thread count.
"""


import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm", reason="timm is not installed: pip install -e '.[test,timm]'")

import fracfx  # noqa: E402
from fracfx.meta import compute_nodes, get_quant_spec  # noqa: E402
from fracfx.nn.quantizers import GradQuant  # noqa: E402
from tests.sweep_checks import _is_covered, _threads, _weight_modules  # noqa: F401 (_threads: autouse fixture)

# name -> (input side, create_model kwargs); families: CNNs, mobile nets with SE and in-place
# activations, tf_ "SAME"-padded models (Conv2dSame), ViT/DeiT/Swin/LeViT/ConvNeXt/PoolFormer, hybrids
MODELS = {
    # residual CNNs
    "resnet18": (32, {}), "seresnet18": (32, {}), "resnext26ts": (32, {}), "regnetx_002": (32, {}),
    "regnety_002": (32, {}), "dla34": (32, {}), "densenet121": (32, {}), "cspresnet50": (64, {}),
    "vgg11": (32, {}), "nf_resnet26": (32, {}), "res2net50_14w_8s": (32, {}), "skresnet18": (32, {}), "repvgg_a0": (32, {}),
    # mobile nets: SE blocks, hard-swish, in-place activations
    "mobilenetv2_050": (32, {}), "mobilenetv3_small_050": (32, {}), "mobilenetv3_large_100": (32, {}),
    "efficientnet_b0": (32, {}), "efficientnet_lite0": (32, {}), "mnasnet_small": (32, {}), "fbnetc_100": (32, {}),
    "rexnet_100": (32, {}), "lcnet_050": (32, {}), "ghostnet_050": (32, {}), "mixnet_s": (32, {}), "hardcorenas_a": (32, {}),
    # tf_ models: "SAME" padding (Conv2dSame, padded pooling)
    "tf_efficientnet_b0": (32, {}), "tf_mobilenetv3_small_minimal_100": (32, {}), "tf_efficientnetv2_b0": (32, {}),
    "tf_mixnet_s": (32, {}),
    # transformers and MLP-likes
    "vit_tiny_patch16_224": (32, {"img_size": 32}), "deit_tiny_patch16_224": (32, {"img_size": 32}),
    "deit_tiny_distilled_patch16_224": (32, {"img_size": 32}), "swin_tiny_patch4_window7_224": (56, {"img_size": 56, "window_size": 7}),
    "levit_128s": (64, {"img_size": 64}), "convnext_atto": (32, {}), "convnextv2_atto": (32, {}), "poolformer_s12": (32, {}),
    "poolformerv2_s12": (32, {}), "mixer_s16_224": (32, {"img_size": 32}), "resmlp_12_224": (32, {"img_size": 32}),
    "xcit_nano_12_p16_224": (32, {"img_size": 32}), "pit_ti_224": (64, {"img_size": 64}),
    # hybrids
    "mobilevit_xxs": (64, {}), "edgenext_xx_small": (64, {}),
    "coat_lite_tiny": (32, {"img_size": 32}),
}


def check_model(name: str) -> list[tuple[str, str]]:
    """Run the checks on one model; returns (module path, reason) of what stays FP32."""
    torch.manual_seed(0)
    size, kwargs = MODELS[name]
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    x = torch.randn(2, 3, size, size)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    model.train()
    weight_modules = _weight_modules(model)
    gm = fracfx.transform(model, fracfx.QuantConfig(trace_fallback=False), example_inputs=x)
    del model
    assert gm.meta.get("fracfx_trace_leaves", ()) == ()

    fracfx.set_bits(gm, 0, 0, 0)
    gm.eval()
    with torch.no_grad():
        got = gm(x)
    assert torch.equal(got, expected), f"{name}: disabled quantization differs by {(got - expected).abs().max().item():.3g}"

    fracfx.set_bits(gm, 8, 8, 8)
    gm.train()
    assert sum(isinstance(m, GradQuant) for m in gm.modules()) > 0
    out = gm(x)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    grads = [p.grad for p in gm.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads), f"{name}: non-finite gradients"

    quantized = {get_quant_spec(n).module_path for n in compute_nodes(gm.graph) if get_quant_spec(n).quantize}
    report = fracfx.fp32_report(gm)
    assert all(op.reason for op in report)
    fp32 = {op.module_path for op in report}
    missing = [p for p in weight_modules if not _is_covered(p, quantized - {""}) and not _is_covered(p, fp32)]
    assert not missing, f"{name}: neither quantized nor in fp32_report: {missing[:5]}"
    return [(op.module_path, op.reason) for op in report]


# known gaps, each with what was measured
KNOWN: dict[str, str] = {}


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN[n], strict=False)) if n in KNOWN else n for n in MODELS])
def test_timm_model(name):
    check_model(name)


if __name__ == "__main__":  # python tests/test_timm_sweep.py: the sweep with what stays FP32 per model
    import sys
    import time

    for name in sys.argv[1:] or MODELS:
        start = time.perf_counter()
        try:
            kept = check_model(name)
            print(f"{name}: ok {time.perf_counter() - start:.1f} s; FP32: {kept}", flush=True)
        except Exception as error:  # noqa: BLE001 - a report
            print(f"{name}: FAIL {type(error).__name__}: {str(error)[:300]}", flush=True)
