"""fracfx.data: the Fashion-MNIST reader, CIFAR/ImageNet layouts on files the tests write, and the
reproducible, resumable data order."""

from __future__ import annotations

import gzip
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fracfx.data.images import TensorImages, build_loaders, load_fashion_mnist, pad_crop_flip
from fracfx.data.sampler import EpochBatchSampler, train_batches
from fracfx.seeding import mix_seed
from fracfx.errors import ConfigError, FracfxError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").exists(), reason="needs `apt-get install dataset-fashion-mnist`")


# --- order and augmentation -------------------------------------------------------------------


def _toy_loader(n=37, batch=8, seed=5, workers=0):
    images = torch.arange(n * 3 * 8 * 8, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 3, 8, 8)
    labels = torch.arange(n) % 10
    data = TensorImages(images, labels, (0.5,) * 3, (0.25,) * 3, augment=True, seed=seed, padding=2)
    return DataLoader(data, batch_sampler=EpochBatchSampler(n, batch, seed=seed), num_workers=workers)


def _take(stream, count):
    return [next(stream) for _ in range(count)]


def test_epoch_permutations_depend_only_on_seed_and_epoch():
    a, b = EpochBatchSampler(50, 8, seed=1), EpochBatchSampler(50, 8, seed=1)
    assert torch.equal(a.permutation(3), b.permutation(3))
    assert not torch.equal(a.permutation(0), a.permutation(1))
    assert not torch.equal(a.permutation(0), EpochBatchSampler(50, 8, seed=2).permutation(0))
    assert sorted(a.permutation(7).tolist()) == list(range(50))
    assert a.batches_per_epoch == 7 and len(list(a)) == 7  # 6 full batches and one of 2
    a.set_position(2, 5)
    assert len(a) == 2 and [len(b) for b in a] == [8, 2]


def test_set_position_rejects_batches_outside_the_epoch():
    with pytest.raises(ConfigError, match="outside"):
        EpochBatchSampler(50, 8, seed=0).set_position(0, 7)


def test_resuming_the_stream_mid_epoch_gives_the_same_batches():
    full = _take(train_batches(_toy_loader(), 0), 12)  # 5 batches per epoch: crosses two epochs
    resumed = _take(train_batches(_toy_loader(), 7), 5)
    for (i, x, y), (j, x2, y2) in zip(full[7:], resumed):
        assert i == j and torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(full[0][1], full[5][1])  # epoch 1 is another order and augmentation


def test_data_does_not_depend_on_workers_or_the_global_rng():
    torch.manual_seed(123)
    serial = _take(train_batches(_toy_loader(workers=0), 3), 4)
    torch.manual_seed(999)
    parallel = _take(train_batches(_toy_loader(workers=2), 3), 4)
    for (i, x, y), (j, x2, y2) in zip(serial, parallel):
        assert i == j and torch.equal(x, x2) and torch.equal(y, y2)


def test_pad_crop_flip_keeps_size_and_moves_content():
    image = torch.arange(16.0).view(1, 4, 4) + 1
    crops = {tuple(pad_crop_flip(image, 4, 2, random.Random(s)).flatten().tolist()) for s in range(40)}
    assert all(len(c) == 16 for c in crops)
    assert tuple(image.flatten().tolist()) in crops or tuple(image.flip(-1).flatten().tolist()) in crops
    assert len(crops) > 10  # many offsets and both flips
    assert any(0.0 in c for c in crops)  # zero padding shows up at the border


def test_mix_seed_is_stable_and_spreads():
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3)
    assert len({mix_seed(0, e, i) for e in range(10) for i in range(100)}) == 1000
    assert 0 <= mix_seed(2**70, -5) < 2**63


# --- Fashion-MNIST ----------------------------------------------------------------------------


@needs_fashion
def test_fashion_mnist_loaders_shape_classes_and_normalization():
    train, test, info = build_loaders("fashion-mnist", batch_size=64, seed=0, test_subset=2000)
    assert (info.in_channels, info.num_classes, info.input_size) == (1, 10, 28)
    assert info.train_size == 60000 and info.test_size == 2000
    assert train.batch_sampler.batches_per_epoch == 938
    x, y = next(iter(train))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    xs, ys = zip(*test)
    x, y = torch.cat(xs), torch.cat(ys)
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05  # normalized
    assert set(y.tolist()) == set(range(10))


@needs_fashion
def test_fashion_mnist_reader_matches_the_idx_bytes():
    (train_x, train_y), (test_x, test_y) = load_fashion_mnist()
    assert train_x.shape == (60000, 1, 28, 28) and train_x.dtype == torch.uint8
    assert test_y.shape == (10000,)
    with gzip.open(FASHION_DIR / "t10k-images-idx3-ubyte.gz") as handle:
        raw = handle.read()
    assert bytes(test_x[0].flatten().tolist()) == raw[16:16 + 784]


def test_missing_fashion_mnist_names_the_package(tmp_path):
    with pytest.raises(FracfxError, match="apt-get install dataset-fashion-mnist"):
        build_loaders("fashion-mnist", datadir=tmp_path)


def test_corrupt_idx_file_is_reported(tmp_path):
    for prefix in ("train", "t10k"):
        for kind, magic in (("images-idx3", 2051), ("labels-idx1", 2049)):
            with gzip.open(tmp_path / f"{prefix}-{kind}-ubyte.gz", "wb") as handle:
                handle.write((1234).to_bytes(4, "big") + bytes(16))
    with pytest.raises(FracfxError, match="bad magic"):
        load_fashion_mnist(tmp_path)


def test_truncated_idx_file_is_reported(tmp_path):
    for prefix in ("train", "t10k"):
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as handle:
            handle.write((2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (3, 28, 28)) + bytes(100))
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as handle:
            handle.write((2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(3))
    with pytest.raises(FracfxError, match="truncated"):
        load_fashion_mnist(tmp_path)


def test_unknown_dataset_suggests_a_name():
    with pytest.raises(ConfigError, match="did you mean 'cifar10'"):
        build_loaders("cifar-10")


# --- CIFAR (torchvision's pickle layout, written here) ----------------------------------------


def _write_cifar_batch(path: Path, count: int, label_key: bytes, offset: int) -> None:
    rng = np.random.default_rng(offset)
    entry = {
        b"batch_label": b"testing batch",
        label_key: [int(v) for v in (np.arange(count) + offset) % (100 if label_key == b"fine_labels" else 10)],
        b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
        b"filenames": [f"img{i}.png".encode() for i in range(count)],
    }
    with open(path, "wb") as handle:
        pickle.dump(entry, handle, protocol=2)


@pytest.fixture
def cifar10_dir(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        _write_cifar_batch(folder / f"data_batch_{i}", 6, b"labels", i)
    _write_cifar_batch(folder / "test_batch", 5, b"labels", 0)
    return tmp_path


def test_cifar10_layout(cifar10_dir):
    train, test, info = build_loaders("cifar10", datadir=cifar10_dir, batch_size=4, seed=0)
    assert (info.in_channels, info.num_classes, info.input_size, info.train_size, info.test_size) == (3, 10, 32, 30, 5)
    x, y = next(iter(train))
    assert x.shape == (4, 3, 32, 32)
    x, y = next(iter(test))
    with open(cifar10_dir / "cifar-10-batches-py" / "test_batch", "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")
    expected = torch.from_numpy(raw[b"data"].reshape(-1, 3, 32, 32)).float() / 255
    mean, std = torch.tensor(info.mean).view(3, 1, 1), torch.tensor(info.std).view(3, 1, 1)
    torch.testing.assert_close(x, (expected - mean) / std)  # CHW order, no augmentation on test
    assert y.tolist() == raw[b"labels"]


def test_cifar100_layout_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _write_cifar_batch(folder / "train", 12, b"fine_labels", 90)
    _write_cifar_batch(folder / "test", 4, b"fine_labels", 97)
    train, test, info = build_loaders("cifar100", datadir=tmp_path, batch_size=4)
    assert info.num_classes == 100 and info.train_size == 12
    assert next(iter(test))[1].tolist() == [97, 98, 99, 0]


def test_cifar_needs_datadir_and_names_missing_files(tmp_path, cifar10_dir):
    with pytest.raises(ConfigError, match="--datadir"):
        build_loaders("cifar10")
    with pytest.raises(FracfxError, match="--download"):
        build_loaders("cifar100", datadir=tmp_path)
    (cifar10_dir / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FracfxError, match="data_batch_3"):
        build_loaders("cifar10", datadir=cifar10_dir)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_cifar_batch_that_would_run_code_is_refused(cifar10_dir):
    marker = cifar10_dir / "pwned"
    with open(cifar10_dir / "cifar-10-batches-py" / "data_batch_2", "wb") as handle:
        pickle.dump({b"data": _RunsCode(str(marker)), b"labels": []}, handle, protocol=2)
    with pytest.raises(FracfxError, match="not a readable CIFAR batch"):
        build_loaders("cifar10", datadir=cifar10_dir)
    assert not marker.exists()


# --- ImageNet (ImageFolder of PNGs written here) ----------------------------------------------


@pytest.fixture
def imagenet_dir(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for cls in ("n01", "n02"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40 + 7 * i, 52, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return tmp_path


def test_imagenet_folder_layout_and_transforms(imagenet_dir):
    train, test, info = build_loaders("imagenet", datadir=imagenet_dir, batch_size=4, seed=1)
    assert (info.num_classes, info.input_size, info.train_size, info.test_size) == (2, 224, 6, 4)
    x, y = next(iter(train))
    assert x.shape == (4, 3, 224, 224) and set(y.tolist()) <= {0, 1}
    x, y = next(iter(test))
    assert x.shape == (4, 3, 224, 224) and y.tolist() == [0, 0, 1, 1]


def test_imagenet_augmentation_is_seeded_per_sample_and_leaves_the_global_rng(imagenet_dir):
    train, _, _ = build_loaders("imagenet", datadir=imagenet_dir, batch_size=3, seed=1)
    dataset = train.dataset
    before = torch.get_rng_state()
    a, b, c = dataset[(0, 2)][0], dataset[(0, 2)][0], dataset[(1, 2)][0]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_imagenet_needs_train_and_val(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FracfxError, match="val"):
        build_loaders("imagenet", datadir=tmp_path)
