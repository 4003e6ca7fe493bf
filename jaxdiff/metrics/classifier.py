"""A small CNN classifier of MNIST digits, the feature extractor of the sample-quality metrics.

Its penultimate layer (``[B, 128]``, after ReLU) plays the role Inception-v3's pool features play
for FID on natural images; its logits give the conditional accuracy and class histogram of samples.
Two conv blocks (32 and 64 channels, 3x3, each followed by 2x2 max pooling), one hidden dense layer
of 128 units and a 10-way output. Inputs are NHWC ``[B, 28, 28, 1]`` float in ``[-1, 1]``, the
range of the diffusion models' data.

    >>> import jax
    >>> params = init_classifier(jax.random.key(0))
    >>> sum(p.size for p in jax.tree.leaves(params))
    421642

Training and use (it trains on MNIST, so this part is not a doctest; ``experiments.eval_mnist``
runs it and reports the test accuracy)::

    params = train_classifier(images, labels, key=jax.random.key(0), epochs=3, batch_size=128)
    save_classifier("classifier.msgpack", params, {"test_accuracy": accuracy})
    feats, logits = classify(load_classifier("classifier.msgpack"), test_images)
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax import serialization

from jaxdiff.compile_options import cpu_compiler_options
from jaxdiff.validation import InvalidFileError

__all__ = [
    "MnistClassifier",
    "init_classifier",
    "train_classifier",
    "classifier_features",
    "classifier_logits",
    "classify",
    "classifier_accuracy",
    "save_classifier",
    "load_classifier",
]

_INPUT_SHAPE = (28, 28, 1)
_FORMAT = "jaxdiff.metrics.classifier/v1"


class MnistClassifier(nn.Module):
    """Conv(32)-pool-Conv(64)-pool-Dense(hidden)-Dense(num_classes), ReLU activations."""

    channels: tuple[int, ...] = (32, 64)
    hidden: int = 128
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x: [B, 28, 28, 1]`` in ``[-1, 1]`` -> ``(features [B, hidden], logits [B, K])``."""
        for ch in self.channels:
            x = nn.relu(nn.Conv(ch, (3, 3), padding="SAME")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        features = nn.relu(nn.Dense(self.hidden)(x))
        return features, nn.Dense(self.num_classes)(features)


def _check_images(x: jax.Array) -> None:
    if x.ndim != 4 or tuple(x.shape[1:]) != _INPUT_SHAPE:
        raise ValueError(f"images must have shape [B, 28, 28, 1] (NHWC), got {tuple(x.shape)}")


def init_classifier(key: jax.Array) -> Any:
    """Fresh parameters of :class:`MnistClassifier` (the ``"params"`` collection)."""
    return MnistClassifier().init(key, jnp.zeros((1, *_INPUT_SHAPE), jnp.float32))["params"]


def classifier_features(params: Any, x: jax.Array) -> jax.Array:
    """Penultimate-layer features ``[B, 128]`` of images ``x: [B, 28, 28, 1]`` in ``[-1, 1]``."""
    _check_images(x)
    return MnistClassifier().apply({"params": params}, x)[0]


def classifier_logits(params: Any, x: jax.Array) -> jax.Array:
    """Logits ``[B, 10]`` of images ``x: [B, 28, 28, 1]`` in ``[-1, 1]``."""
    _check_images(x)
    return MnistClassifier().apply({"params": params}, x)[1]


def _features_and_logits(params, x):
    return _jitted_features_and_logits()(params, x)


@functools.lru_cache(maxsize=None)
def _jitted_features_and_logits():
    """Jitted on first use (not at import: the CPU options query the backend)."""
    return jax.jit(lambda params, x: MnistClassifier().apply({"params": params}, x),
                   compiler_options=cpu_compiler_options())


def classify(
    params: Any, images: jax.Array, *, batch_size: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """Features ``[N, 128]`` and logits ``[N, 10]`` (float32 numpy) of ``images: [N, 28, 28, 1]``,
    computed in jitted batches of ``batch_size`` (the last batch is padded, so one compilation)."""
    images = np.asarray(images, dtype=np.float32)
    _check_images(images)
    n = images.shape[0]
    feats, logits = [], []
    for start in range(0, n, batch_size):
        chunk = images[start:start + batch_size]
        pad = batch_size - chunk.shape[0] if n > batch_size else 0
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *_INPUT_SHAPE), np.float32)])
        f, lg = _features_and_logits(params, chunk)
        feats.append(np.asarray(f)[: batch_size - pad])
        logits.append(np.asarray(lg)[: batch_size - pad])
    return np.concatenate(feats), np.concatenate(logits)


def classifier_accuracy(
    params: Any, images: jax.Array, labels: jax.Array, *, batch_size: int = 1000
) -> float:
    """Top-1 accuracy on ``images: [N, 28, 28, 1]`` with ``labels: [N]`` int."""
    _, logits = classify(params, images, batch_size=batch_size)
    return float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))


def _make_train_step(tx: optax.GradientTransformation) -> Callable:
    def loss_fn(params, x, y):
        logits = MnistClassifier().apply({"params": params}, x)[1]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == y)

    @functools.partial(jax.jit, donate_argnums=(0, 1), compiler_options=cpu_compiler_options())
    def step(params, opt_state, x, y):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, "accuracy": acc}

    return step


def train_classifier(
    images: jax.Array,
    labels: jax.Array,
    *,
    key: jax.Array,
    epochs: int = 3,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    weight_decay: float = 1e-4,
    log_fn: Optional[Callable[[str], None]] = None,
) -> Any:
    """Train :class:`MnistClassifier` with AdamW and a warmup-cosine learning rate.

    Args:
      images: ``[N, 28, 28, 1]`` float in ``[-1, 1]`` (host numpy is fine; batches are gathered on
        the host and fed to one jitted, donated train step).
      labels: ``[N]`` int in ``0 .. 9``.
      key: PRNG key for the initialisation and the per-epoch shuffles (``fold_in(key, epoch)``).
      epochs: passes over the data.
      batch_size: examples per step; the last partial batch of each epoch is dropped
        (``N >= batch_size``).
      learning_rate: the peak AdamW learning rate.
      weight_decay: AdamW's weight decay.
      log_fn: called with one line per epoch (e.g. ``print``); ``None`` for silence.

    Returns:
      The trained ``params`` pytree.
    """
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int32)
    _check_images(images)
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must have shape [N] = [{images.shape[0]}], got {labels.shape}")
    if epochs < 1 or not 1 <= batch_size <= images.shape[0]:
        raise ValueError(f"need epochs >= 1 and 1 <= batch_size <= N, got {epochs}, {batch_size}")
    steps_per_epoch = images.shape[0] // batch_size
    total = epochs * steps_per_epoch
    warmup = max(1, total // 20)
    lr = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps=warmup, decay_steps=max(total, warmup + 1))
    tx = optax.adamw(lr, weight_decay=weight_decay)
    init_key, shuffle_key = jax.random.split(key)
    params = init_classifier(init_key)
    opt_state = tx.init(params)
    step = _make_train_step(tx)
    for epoch in range(epochs):
        epoch_key = jax.random.fold_in(shuffle_key, epoch)
        perm = np.asarray(jax.random.permutation(epoch_key, images.shape[0]))
        loss_sum, acc_sum = 0.0, 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            params, opt_state, metrics = step(params, opt_state, images[idx], labels[idx])
            if log_fn is not None:  # a host sync per step only when someone listens
                loss_sum += float(metrics["loss"])
                acc_sum += float(metrics["accuracy"])
        if log_fn is not None:
            log_fn(f"classifier epoch {epoch + 1}/{epochs}: loss {loss_sum / steps_per_epoch:.4f}, "
                   f"train accuracy {acc_sum / steps_per_epoch:.4f}")
    return params


def save_classifier(path: str, params: Any, metadata: Optional[dict] = None) -> None:
    """Write ``params`` (and a flat dict of str/number ``metadata``) as one msgpack file.

    The file is written to ``path + ".tmp"`` then renamed, so a crash never leaves half a file.
    """
    payload = {
        "format": _FORMAT,
        "params": jax.tree_util.tree_map(np.asarray, params),
        "metadata": dict(metadata or {}),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(serialization.msgpack_serialize(payload))
    os.replace(tmp, path)


def load_classifier(path: str, *, with_metadata: bool = False) -> Any:
    """Read parameters written by :func:`save_classifier`, checking every shape against the model.

    Returns ``params``, or ``(params, metadata)`` with ``with_metadata``.

    Raises:
      FileNotFoundError: no file at ``path``.
      jaxdiff.validation.InvalidFileError: (a ``ValueError``) the file is not a classifier file
        (corrupt or truncated msgpack, another format), or holds parameters of a different
        architecture; the message names the file and says to delete it (the evaluations then
        train a new one) or to pass another.
    """
    fix = "delete it to train a new classifier, or pass another file"
    with open(path, "rb") as f:
        raw = f.read()
    try:
        payload = serialization.msgpack_restore(raw)
    except Exception as e:  # msgpack's ExtraData / FormatError / StackError, ValueError, ...
        raise InvalidFileError(f"{path}: not a classifier file written by save_classifier (not "
                               f"valid msgpack, {len(raw)} bytes: {type(e).__name__}: {e}); "
                               f"{fix}") from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise InvalidFileError(f"{path}: not a classifier file written by save_classifier "
                               f"(no format {_FORMAT!r} entry); {fix}")
    expected = jax.eval_shape(init_classifier, jax.random.key(0))
    try:
        params = serialization.from_state_dict(expected, payload["params"])
        mismatched = jax.tree_util.tree_map(lambda e, p: tuple(e.shape) != tuple(p.shape),
                                            expected, params)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InvalidFileError(f"{path}: parameters do not match MnistClassifier ({e}); "
                               f"{fix}") from None
    if any(jax.tree_util.tree_leaves(mismatched)):
        raise InvalidFileError(f"{path}: parameter shapes do not match MnistClassifier; {fix}")
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return (params, payload.get("metadata", {})) if with_metadata else params
