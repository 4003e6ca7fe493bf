"""Dataset loaders (local IDX files, tfds, image folders with captions) and resumable batch
iterators."""

from jaxdiff.data.controlnet_folder import (CONDITIONING_COLUMN, ControlNetFolder,
                                            load_conditioning_images, read_controlnet_folder)
from jaxdiff.data.idx import read_idx, write_idx
from jaxdiff.data.image_buckets import (BucketIterator, assign_buckets, bucket_sizes,
                                        bucketed_image_folder_source, image_size)
from jaxdiff.data.image_folder import (CAPTION_SOURCES, IMAGE_EXTENSIONS, ImageFolder, check_image,
                                       read_image_folder)
from jaxdiff.data.image_source import ImageFolderIterator, image_folder_source, tokenize_captions
from jaxdiff.data.image_transforms import load_image, load_images, resized_size, transform_image
from jaxdiff.data.iterator import BatchIterator, DataSource, Prefetcher, ResumableIterator
from jaxdiff.data.mnist import (HOW_TO_GET_MNIST, MNIST_ENV_VAR, find_mnist_dir, how_to_get_mnist,
                                load_mnist, mnist_search_dirs, scale_images)

__all__ = ["read_idx", "write_idx", "BatchIterator", "Prefetcher", "ResumableIterator",
           "DataSource", "load_mnist",
           "find_mnist_dir", "mnist_search_dirs", "scale_images", "MNIST_ENV_VAR",
           "HOW_TO_GET_MNIST", "how_to_get_mnist",
           "ImageFolder", "read_image_folder", "check_image", "IMAGE_EXTENSIONS",
           "CAPTION_SOURCES", "image_folder_source", "ImageFolderIterator", "tokenize_captions",
           "load_image", "load_images", "transform_image", "resized_size",
           "bucket_sizes", "assign_buckets", "image_size", "bucketed_image_folder_source",
           "BucketIterator", "CONDITIONING_COLUMN", "ControlNetFolder", "read_controlnet_folder",
           "load_conditioning_images"]
