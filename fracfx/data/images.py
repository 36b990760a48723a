"""Datasets for `fracfx train`: Fashion-MNIST (offline default), CIFAR-10/100 and ImageNet.

    train_loader, test_loader, info = build_loaders("fashion-mnist", batch_size=128, seed=0)

Reproducible, resumable data order
----------------------------------
The training loader's batch sampler (EpochBatchSampler) derives epoch e's permutation from
(seed, e) alone, and yields keys (epoch, index) rather than bare indices. The training dataset
seeds each sample's augmentation from (seed, epoch, index). So the data a run sees depends only
on the seed and the iteration -- not on the number of workers, nor on whether the run was
interrupted: a resumed run calls `sampler.set_position(epoch, batch)` (train_batches() does it
from the iteration) and gets exactly the batches an uninterrupted run would have got.

Augmentation
------------
fashion-mnist: pad 4 zero pixels on every side (zero = the black background), random 28x28 crop,
  horizontal flip with p = 0.5, then normalize (mean 0.2860, std 0.3530). 28x28, 1 channel.
cifar10/cifar100: the same with 32x32 crops (docs/method.md section 6), per-channel normalize.
  Read from torchvision's pickle layout under --datadir (cifar-10-batches-py/,
  cifar-100-python/); `download=True` fetches it there with torchvision first.
imagenet: ImageFolder under --datadir/train and --datadir/val; RandomResizedCrop 224 + flip for
  training, Resize 256 + CenterCrop 224 for testing (torchvision transforms, run under a torch
  RNG seeded per sample so they obey the same reproducibility rule).
Test sets are never augmented; they are iterated in order.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import random
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from fracfx.data.sampler import EpochBatchSampler, rank_shard
from fracfx.errors import ConfigError, FracfxError
from fracfx.seeding import mix_seed

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagenet")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset."""

    name: str
    in_channels: int
    num_classes: int
    input_size: int  # square images: height = width
    train_size: int
    test_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Order and augmentation


def pad_crop_flip(image: torch.Tensor, size: int, padding: int, rng: random.Random) -> torch.Tensor:
    """Zero-pad by `padding`, take a random size x size crop, flip horizontally with p = 0.5."""
    padded = F.pad(image, (padding,) * 4)
    top = rng.randrange(padded.shape[-2] - size + 1)
    left = rng.randrange(padded.shape[-1] - size + 1)
    out = padded[..., top:top + size, left:left + size]
    return out.flip(-1) if rng.random() < 0.5 else out


class TensorImages(Dataset):
    """In-memory uint8 images (N, C, H, W) and int64 labels; returns normalized float tensors.

    In training mode (augment=True) items are looked up by (epoch, index) keys and augmented with
    pad_crop_flip seeded from (seed, epoch, index); otherwise by plain indices, unaugmented.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, *, augment: bool = False, seed: int = 0, padding: int = 4):
        self.images, self.labels = images, labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment, self.seed, self.padding = augment, seed, padding

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        if self.augment:
            epoch, index = key
        else:
            index = key
        image = self.images[index].float().div_(255.0)
        if self.augment:
            rng = random.Random(mix_seed(self.seed, epoch, index))
            image = pad_crop_flip(image, image.shape[-1], self.padding, rng)
        return (image - self.mean) / self.std, int(self.labels[index])


class SeededTransform(Dataset):
    """A dataset whose (PIL) samples go through torchvision transforms under a per-sample seed.

    Training items are looked up by (epoch, index) keys; the global torch RNG is forked and
    seeded from (seed, epoch, index) around the transform, so neither the order of workers nor
    the caller's RNG state changes what a sample becomes. Test items use plain indices.
    """

    def __init__(self, base: Dataset, transform: Callable, *, augment: bool, seed: int = 0):
        self.base, self.transform, self.augment, self.seed = base, transform, augment, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        if not self.augment:
            image, label = self.base[key]
            return self.transform(image), label
        epoch, index = key
        image, label = self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, epoch, index))
            return self.transform(image), label


# ---------------------------------------------------------------------------------------------
# Readers


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise FracfxError(f"cannot read {path}: {error}; reinstall with `apt-get install --reinstall dataset-fashion-mnist`") from error
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise FracfxError(f"{path} is not an IDX file (bad magic number); reinstall with `apt-get install --reinstall dataset-fashion-mnist`")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape))
    if len(data) != header + count:
        raise FracfxError(f"{path} is truncated or corrupt: expected {header + count} bytes, found {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def load_fashion_mnist(datadir: str | os.PathLike | None = None) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((train_images, train_labels), (test_images, test_labels)) as uint8 (N,1,28,28), int64 (N,)."""
    root = Path(datadir or FASHION_MNIST_DIR)
    splits = []
    for prefix in ("train", "t10k"):
        images_path = _find_idx(root, f"{prefix}-images-idx3-ubyte")
        labels_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
        if images_path is None or labels_path is None:
            raise FracfxError(
                f"Fashion-MNIST not found in {root} (looked for {prefix}-images-idx3-ubyte.gz and "
                f"{prefix}-labels-idx1-ubyte.gz); install it with `apt-get install dataset-fashion-mnist` "
                f"(files go to {FASHION_MNIST_DIR}) or point --datadir at a folder holding them"
            )
        images = _read_idx(images_path, 2051, 3)
        labels = _read_idx(labels_path, 2049, 1)
        if len(images) != len(labels):
            raise FracfxError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
        splits.append((torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))))
    return splits[0], splits[1]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch files: plain containers and numpy arrays, nothing callable else.

    _codecs.encode is how Python 3's protocol-2 pickles spell bytes; it only encodes a string.
    """

    _ALLOWED = {
        ("_codecs", "encode"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch file")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


def _read_cifar_batches(folder: Path, names: Sequence[str], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in names:
        path = folder / name
        try:
            with open(path, "rb") as handle:
                entry = _NumpyOnlyUnpickler(handle, encoding="bytes").load()
            data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            target = np.asarray(entry[label_key], dtype=np.int64)
        except Exception as error:
            raise FracfxError(f"{path} is not a readable CIFAR batch file ({type(error).__name__}: {error})") from error
        if len(data) != len(target):
            raise FracfxError(f"{path}: {len(data)} images but {len(target)} labels")
        images.append(torch.from_numpy(data.copy()))
        labels.append(torch.from_numpy(target))
    return torch.cat(images), torch.cat(labels)


def load_cifar(name: str, datadir: str | os.PathLike | None, *, download: bool = False):
    """((train_images, train_labels), (test_images, test_labels)) from torchvision's pickle layout."""
    if datadir is None:
        raise ConfigError(f"{name} needs --datadir: the folder holding {CIFAR_LAYOUT[name][0]}/ (add --download to fetch it there)")
    root = Path(datadir)
    folder_name, train_names, test_names, label_key, _ = CIFAR_LAYOUT[name]
    folder = root / folder_name
    if download and not folder.is_dir():
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            cls(root=str(root), train=True, download=True)
        except Exception as error:  # no network, bad mirror...
            raise FracfxError(f"downloading {name} to {root} failed: {error}") from error
    missing = [n for n in (*train_names, *test_names) if not (folder / n).is_file()]
    if missing:
        raise FracfxError(
            f"{name} not found: {folder} lacks {', '.join(missing)}; put torchvision's "
            f"{folder_name}/ under --datadir, or add --download to fetch it"
        )
    return _read_cifar_batches(folder, train_names, label_key), _read_cifar_batches(folder, test_names, label_key)


# ---------------------------------------------------------------------------------------------
# Assembly

_NORMALIZE = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _subset(dataset: Dataset, limit: int | None) -> Dataset:
    if limit is None or limit >= len(dataset):
        return dataset
    if limit <= 0:
        raise ConfigError(f"a subset size must be positive, got {limit}")
    return torch.utils.data.Subset(dataset, range(limit))


class _KeyedSubset(Dataset):
    """The first `limit` samples of a keyed (epoch, index) training dataset."""

    def __init__(self, base: Dataset, limit: int):
        self.base, self.limit = base, limit

    def __len__(self) -> int:
        return self.limit

    def __getitem__(self, key):
        return self.base[key]


def build_datasets(name: str, *, datadir: str | os.PathLike | None = None, download: bool = False, seed: int = 0) -> tuple[Dataset, Dataset, DatasetInfo]:
    """(train, test, info). Train items are keyed by (epoch, index); test items by index."""
    if name not in DATASETS:
        import difflib

        close = difflib.get_close_matches(name, DATASETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown dataset {name!r}{hint}; choose from {', '.join(DATASETS)}")
    mean, std = _NORMALIZE[name]
    if name == "imagenet":
        return _imagenet(datadir, mean, std, seed)
    if name == "fashion-mnist":
        (train_x, train_y), (test_x, test_y) = load_fashion_mnist(datadir)
        num_classes = 10
    else:
        (train_x, train_y), (test_x, test_y) = load_cifar(name, datadir, download=download)
        num_classes = CIFAR_LAYOUT[name][4]
    train = TensorImages(train_x, train_y, mean, std, augment=True, seed=seed)
    test = TensorImages(test_x, test_y, mean, std)
    info = DatasetInfo(name, train_x.shape[1], num_classes, train_x.shape[-1], len(train), len(test), mean, std)
    return train, test, info


def _imagenet(datadir, mean, std, seed):
    from torchvision import datasets, transforms

    if datadir is None:
        raise ConfigError("imagenet needs --datadir: a folder with train/ and val/ in ImageFolder layout (one subfolder per class)")
    root = Path(datadir)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FracfxError(f"imagenet: {root / split} is missing; --datadir must hold train/ and val/, each with one folder per class")
    normalize = transforms.Normalize(mean, std)
    train_tf = transforms.Compose([
        transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize,
    ])
    test_tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalize])
    try:
        train_base = datasets.ImageFolder(str(root / "train"))
        test_base = datasets.ImageFolder(str(root / "val"))
    except (FileNotFoundError, RuntimeError) as error:
        raise FracfxError(f"imagenet: {error}") from error
    if train_base.classes != test_base.classes:
        raise FracfxError(f"imagenet: train/ has {len(train_base.classes)} classes but val/ has {len(test_base.classes)}; they must match")
    train = SeededTransform(train_base, train_tf, augment=True, seed=seed)
    test = SeededTransform(test_base, test_tf, augment=False)
    info = DatasetInfo("imagenet", 3, len(train_base.classes), 224, len(train), len(test), mean, std)
    return train, test, info


def build_loaders(
    name: str = "fashion-mnist",
    *,
    datadir: str | os.PathLike | None = None,
    batch_size: int = 128,
    test_batch_size: int | None = None,
    workers: int = 0,
    seed: int = 0,
    download: bool = False,
    train_subset: int | None = None,
    test_subset: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[DataLoader, DataLoader, DatasetInfo]:
    """(train_loader, test_loader, info).

    The training loader's batch_sampler is an EpochBatchSampler (shuffled, last partial batch
    kept); iterate it with train_batches(loader, start_iteration). train_subset/test_subset keep
    the first N samples (quick runs and tests). With world_size > 1 both loaders hold this
    rank's share: of every global batch of batch_size, and of the test set (info keeps the
    full sizes).
    """
    if workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}")
    train, test, info = build_datasets(name, datadir=datadir, download=download, seed=seed)
    if train_subset is not None:
        if train_subset <= 0:
            raise ConfigError(f"train_subset must be positive, got {train_subset}")
        train = _KeyedSubset(train, min(train_subset, len(train)))
    test = _subset(test, test_subset)
    info = dataclasses.replace(info, train_size=len(train), test_size=len(test))
    sampler = EpochBatchSampler(len(train), batch_size, seed=seed, rank=rank, world_size=world_size)
    generator = torch.Generator().manual_seed(mix_seed(seed, 0x5EED))  # worker base seeds
    common = dict(num_workers=workers, persistent_workers=False)
    train_loader = DataLoader(train, batch_sampler=sampler, generator=generator, **common)
    test_loader = DataLoader(rank_shard(test, rank, world_size), batch_size=test_batch_size or max(batch_size, 256), shuffle=False, **common)
    return train_loader, test_loader, info
