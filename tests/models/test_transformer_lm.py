"""transformer_lm: a causal LM whose every compute op fracfx quantizes, and which trains when quantized."""

import pytest
import torch
import torch.nn.functional as F

import fracfx
from fracfx.data import train_batches
from fracfx.errors import ConfigError
from fracfx.models import build_model
from fracfx.models.transformer_lm import transformer_lm
from fracfx.data.text import build_text_loaders, char_corpus

SMALL = dict(vocab_size=29, d_model=32, n_layers=2, n_heads=4, context=16)


def test_logits_shape_and_causality():
    model = transformer_lm(**SMALL).eval()
    idx = torch.randint(0, 29, (3, 10))
    logits = model(idx)
    assert logits.shape == (3, 10, 29)
    changed = idx.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 29  # change only the future of position 5
    after = model(changed)
    assert torch.equal(after[:, :6], logits[:, :6]) and not torch.equal(after[:, 6:], logits[:, 6:])


def test_tied_and_untied_heads_and_bad_arguments():
    tied, untied = transformer_lm(**SMALL), transformer_lm(**SMALL, tie_weights=False)
    assert tied.head.weight is tied.tok_emb.weight and untied.head.weight is not untied.tok_emb.weight
    with pytest.raises(ConfigError, match="divisible"):
        transformer_lm(vocab_size=10, d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="vocab_size"):
        transformer_lm(vocab_size=0)
    with pytest.raises(Exception, match="context"):
        tied(torch.zeros(1, 17, dtype=torch.long))


def test_registered_in_the_zoo_with_num_classes_as_vocabulary():
    model = build_model("transformer_lm", num_classes=41, d_model=16, n_heads=2)
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 41)


def test_transform_quantizes_every_projection_and_both_attention_matmuls():
    model = transformer_lm(**SMALL)
    idx = torch.randint(0, 29, (2, 12))
    gm = fracfx.transform(model, example_inputs=idx)
    rows = fracfx.cost_report(gm).rows
    per_layer = {f"blocks.{i}.{path}" for i in range(2) for path in ("attn.query", "attn.key", "attn.value", "attn.proj", "attn", "ff.fc1", "ff.fc2")}
    quantized = [r for r in rows if r.act_bits == 8]
    assert {r.module_path for r in quantized} == per_layer
    assert sum(r.kind == "matmul" for r in quantized) == 4  # QK^T and AV in each of 2 layers
    assert [r.node for r in fracfx.fp32_report(gm)] == ["head"]  # the classifier, kept FP32 by default
    fracfx.set_bits(gm, 0, 0, 0)
    for mode in (True, False):
        gm.train(mode), model.train(mode)
        assert torch.equal(gm(idx), model(idx))


@pytest.fixture
def one_thread():
    """Tiny matrices: on the shared 2-core machine one thread is ~10x faster than two contending."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quantized_model_trains_on_text(one_thread):
    torch.manual_seed(0)
    verse = "In the beginning God created the heaven and the earth. And the earth was without form, and void.\n"
    corpus = char_corpus("kjv-like", verse * 60)
    train_loader, _, info = build_text_loaders(corpus=corpus, batch_size=8, context=16, seed=0)
    model = transformer_lm(vocab_size=info.vocab_size, d_model=32, n_layers=1, n_heads=2, context=16)
    gm = fracfx.transform(model, fracfx.QuantConfig(act_bits=8, weight_bits=8, grad_bits=8))
    fracfx.seed_rounding(gm, 0)
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)
    losses = []
    batches = train_batches(train_loader)  # endless, across epochs
    for _ in range(25):
        _, x, y = next(batches)
        loss = F.cross_entropy(gm(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 2.5 and last < 0.7 * first, (first, last)
