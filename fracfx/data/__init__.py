"""Training data: image datasets (images.py), text corpora (text.py) and the deterministic,
resumable (seed, iteration) order both use (sampler.py)."""

from fracfx.data.images import DATASETS, FASHION_MNIST_DIR, DatasetInfo, build_datasets, build_loaders, load_cifar, load_fashion_mnist
from fracfx.data.sampler import EpochBatchSampler, rank_shard, train_batches
from fracfx.seeding import mix_seed

__all__ = [
    "DATASETS", "FASHION_MNIST_DIR", "DatasetInfo", "build_datasets", "build_loaders", "load_cifar", "load_fashion_mnist",
    "EpochBatchSampler", "rank_shard", "train_batches", "mix_seed",
]
