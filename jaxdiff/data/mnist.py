"""MNIST as numpy arrays: from a local directory of the original IDX files, or from tfds.

Sources, in the order ``source="auto"`` tries them:

1. ``data_dir`` if given (it must then hold the IDX files; no fallback).
2. the environment variable ``JAXDIFF_MNIST_DIR`` (if set, it must hold the IDX files; no
   fallback).
3. the local directories of :func:`mnist_search_dirs`, in order: ``data/mnist`` under the working
   directory, ``data/mnist`` under the directory that holds the ``jaxdiff`` package (a source
   checkout's root), then ``~/.cache/jaxdiff/mnist``.
4. ``tensorflow_datasets.data_source("mnist")`` (array_record; needs no TensorFlow, but needs the
   dataset prepared in ``TFDS_DATA_DIR`` or the network to download it).

Every path returns ``images: [N, 28, 28, 1] float32`` in ``[-1, 1]`` and ``labels: [N] int32``.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np

from jaxdiff.data.idx import read_idx
from jaxdiff.validation import InvalidFileError

__all__ = ["load_mnist", "find_mnist_dir", "mnist_search_dirs", "mnist_files", "scale_images",
           "how_to_get_mnist", "MNIST_ENV_VAR", "HOW_TO_GET_MNIST"]

MNIST_ENV_VAR = "JAXDIFF_MNIST_DIR"
_PREFIX = {"train": "train", "test": "t10k"}


def how_to_get_mnist(data_dir_name: str = "data_dir") -> str:
    """How to obtain MNIST, for error messages; ``data_dir_name`` is what the caller calls the
    directory setting (a command line passes its flag, e.g. ``"--data_dir"``)."""
    return (
        f"To get MNIST, either point {data_dir_name} (or the environment variable "
        f"{MNIST_ENV_VAR}) at a directory holding the original IDX files "
        "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
        "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz], from "
        "http://yann.lecun.com/exdb/mnist/ or a mirror), or put them in ./data/mnist or "
        "~/.cache/jaxdiff/mnist, or prepare the tfds dataset once on a machine with network "
        "access (`python -c \"import tensorflow_datasets as tfds; tfds.data_source('mnist')\"`) "
        "and set TFDS_DATA_DIR."
    )


HOW_TO_GET_MNIST = how_to_get_mnist()


def _resolve(directory: str, stem: str) -> Optional[str]:
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def mnist_files(directory: str, split: str, *,
                data_dir_name: str = "data_dir") -> Tuple[str, str]:
    """Paths of the (images, labels) IDX files of ``split`` in ``directory`` (plain or ``.gz``).

    Raises:
      FileNotFoundError: with instructions (:func:`how_to_get_mnist` of ``data_dir_name``), when
        the directory or a file is missing.
    """
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    how = how_to_get_mnist(data_dir_name)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"MNIST directory {directory!r} does not exist. {how}")
    prefix = _PREFIX[split]
    paths = []
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        path = _resolve(directory, stem)
        if path is None:
            raise FileNotFoundError(f"{stem}[.gz] not found in {directory!r}. {how}")
        paths.append(path)
    return paths[0], paths[1]


def mnist_search_dirs() -> list[str]:
    """The local directories that :func:`find_mnist_dir` tries when ``$JAXDIFF_MNIST_DIR`` is
    unset, in order: ``./data/mnist`` (under the working directory), ``data/mnist`` under the
    directory that holds the ``jaxdiff`` package, ``~/.cache/jaxdiff/mnist``.

    Returns:
      Absolute, normalised paths (existing or not), without duplicates.
    """
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    dirs = [os.path.join(os.getcwd(), "data", "mnist"),
            os.path.join(package_parent, "data", "mnist"),
            os.path.expanduser(os.path.join("~", ".cache", "jaxdiff", "mnist"))]
    return list(dict.fromkeys(os.path.normpath(os.path.abspath(d)) for d in dirs))


def find_mnist_dir(split: str = "train") -> Optional[str]:
    """The local directory holding ``split``'s IDX files: ``$JAXDIFF_MNIST_DIR`` if set, else the
    first of :func:`mnist_search_dirs` that holds them.

    Args:
      split: ``"train"`` or ``"test"``.

    Returns:
      The directory, or ``None`` when the variable is unset and no search directory holds the
      files.

    Raises:
      FileNotFoundError: ``$JAXDIFF_MNIST_DIR`` is set but lacks the files (an explicit setting
        that is wrong is an error, not a fallback).
      ValueError: ``split`` is neither ``"train"`` nor ``"test"``.
    """
    env = os.environ.get(MNIST_ENV_VAR)
    if env:
        try:
            mnist_files(env, split)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"${MNIST_ENV_VAR}={env}: {e}") from None
        return env
    for d in mnist_search_dirs():
        try:
            mnist_files(d, split)
            return d
        except FileNotFoundError:
            continue
    return None


def scale_images(images_u8: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` or ``[N, 28, 28, 1]`` -> float32 ``[N, 28, 28, 1]`` in ``[-1, 1]``."""
    x = np.asarray(images_u8, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    return x * np.float32(2.0 / 255.0) - np.float32(1.0)


def _load_local(directory: str, split: str,
                data_dir_name: str) -> Tuple[np.ndarray, np.ndarray]:
    img_path, lbl_path = mnist_files(directory, split, data_dir_name=data_dir_name)
    how = f"The file is corrupt or not MNIST: replace it. {how_to_get_mnist(data_dir_name)}"
    try:
        images = read_idx(img_path, expected_dtype=np.uint8, expected_ndim=3,
                          expected_shape=(None, 28, 28))
        labels = read_idx(lbl_path, expected_dtype=np.uint8, expected_ndim=1)
    except InvalidFileError as e:  # the message names the file and what is wrong
        raise InvalidFileError(f"{e}. {how}") from None
    if images.shape[0] != labels.shape[0]:
        raise InvalidFileError(f"{img_path} has {images.shape[0]} images but {lbl_path} has "
                               f"{labels.shape[0]} labels (the files must pair up). {how}")
    if labels.size and labels.max() > 9:
        raise InvalidFileError(f"{lbl_path}: label {int(labels.max())} out of range 0-9. {how}")
    return scale_images(images), labels.astype(np.int32)


def _load_tfds(split: str, tfds_data_dir: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Reads all of ``split`` through ``tfds.data_source`` (random access, no TensorFlow needed)."""
    import tensorflow_datasets as tfds  # local import: slow, and optional on the local-IDX path

    source = tfds.data_source("mnist", split=split, data_dir=tfds_data_dir)
    n = len(source)
    try:
        records = source.__getitems__(list(range(n)))  # one batched read (array_record)
    except (AttributeError, TypeError):  # e.g. under tfds.testing.mock_data
        records = [source[i] for i in range(n)]
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records]).reshape(n, 28, 28, 1)
    labels = np.asarray([r["label"] for r in records], np.int32)
    return scale_images(images), labels


def load_mnist(
    split: str = "train",
    data_dir: Optional[str] = None,
    *,
    source: str = "auto",
    tfds_data_dir: Optional[str] = None,
    data_dir_name: str = "data_dir",
) -> Tuple[np.ndarray, np.ndarray]:
    """Loads an MNIST split.

    Args:
      split: ``"train"`` (60k) or ``"test"`` (10k).
      data_dir: a directory of IDX files; when given, it is the only source tried.
      source: ``"auto"`` (local dirs, then tfds), ``"local"`` or ``"tfds"``.
      tfds_data_dir: passed to tfds as ``data_dir``.
      data_dir_name: what the messages call ``data_dir`` (a command line passes its flag, e.g.
        ``"--data_dir"`` or ``"--config.data.data_dir"``).

    Returns:
      ``images: [N, 28, 28, 1] float32`` in ``[-1, 1]``, ``labels: [N] int32``.

    Raises:
      FileNotFoundError: no source has the data (the message says how to obtain MNIST).
      jaxdiff.validation.InvalidFileError: (a ``ValueError``) a file is corrupt, truncated, of
        the wrong type/shape, or the images and labels do not pair up; the message names the
        file and says what was expected (e.g. magic number 2051, N bytes, as many labels as
        images).
    """
    if source not in ("auto", "local", "tfds"):
        raise ValueError(f"source must be 'auto', 'local' or 'tfds', got {source!r}")
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    how = "MNIST was not found. " + how_to_get_mnist(data_dir_name)
    if source != "tfds":
        directory = data_dir or find_mnist_dir(split)
        if directory is not None:
            return _load_local(directory, split, data_dir_name)
        if source == "local":
            raise FileNotFoundError(how)
    try:
        import tensorflow_datasets  # noqa: F401  (slow; only where no local copy was found)
    except ImportError as e:
        raise FileNotFoundError(f"tensorflow_datasets is not importable ({e}). {how}") from None
    try:
        return _load_tfds(split, tfds_data_dir)
    except Exception as e:  # tfds raises assorted errors when offline / not prepared
        detail = " ".join(str(e).split())
        raise FileNotFoundError(f"tfds could not provide MNIST ({type(e).__name__}: "
                                f"{detail:.500}). {how}") from None
