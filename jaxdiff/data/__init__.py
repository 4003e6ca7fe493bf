"""Dataset loaders (local IDX files, tfds) and a resumable prefetching batch iterator."""

from jaxdiff.data.idx import read_idx, write_idx
from jaxdiff.data.iterator import BatchIterator, DataSource, Prefetcher, ResumableIterator
from jaxdiff.data.mnist import (HOW_TO_GET_MNIST, MNIST_ENV_VAR, find_mnist_dir, how_to_get_mnist,
                                load_mnist, mnist_search_dirs, scale_images)

__all__ = ["read_idx", "write_idx", "BatchIterator", "Prefetcher", "ResumableIterator",
           "DataSource", "load_mnist",
           "find_mnist_dir", "mnist_search_dirs", "scale_images", "MNIST_ENV_VAR",
           "HOW_TO_GET_MNIST", "how_to_get_mnist"]
