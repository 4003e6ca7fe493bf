"""Fréchet distance between feature distributions (FID), and classifier-based sample statistics.

The Fréchet distance between ``N(mu1, S1)`` and ``N(mu2, S2)`` is

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).

``S1 S2`` is not symmetric, but it is similar to the symmetric positive semi-definite matrix
``M = S1^{1/2} S2 S1^{1/2}``, so ``tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(M))``. Both square roots
come from symmetric eigendecompositions (``eigh``) in float64, with eigenvalues that round to
slightly below zero clamped to zero. This is stable for singular and near-singular covariances
(e.g. features with dead ReLU units), where ``scipy.linalg.sqrtm(S1 @ S2)`` can return complex
values or NaN and needs the usual ``eps * I`` offset.

These statistics are host-side reductions over a whole evaluation set: they run in float64 numpy
(JAX's default float32 loses the cancellation in ``tr(S1) + tr(S2) - 2 tr(...)`` for close
distributions) and accept ``jax.Array`` or numpy inputs. The per-sample classifier statistics
(:func:`conditional_accuracy`, :func:`class_histogram`) are plain ``jnp`` and may be jitted.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> mu1, s1 = feature_statistics(rng.standard_normal((500, 8)))       # [N, D] -> [D], [D, D]
    >>> mu2, s2 = feature_statistics(rng.standard_normal((500, 8)) + 1.0)
    >>> mu1.shape, s1.shape
    ((8,), (8, 8))
    >>> round(frechet_distance(mu1, s1, mu1, s1), 6)                     # a distance: 0 to itself
    0.0
    >>> bool(frechet_distance(mu1, s1, mu2, s2) > 7.0)                   # |mu1 - mu2|^2 is about 8
    True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "fid_from_features",
    "conditional_accuracy",
    "class_histogram",
]


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root of a symmetric ``[D, D]`` matrix; negative eigenvalues -> 0."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _symmetrize(a: np.ndarray) -> np.ndarray:
    return 0.5 * (a + a.T)


def _check_stats(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1:
        raise ValueError(f"mu{name} must be a vector [D], got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"sigma{name} must have shape [D, D] = {(mu.shape[0],) * 2} to match mu{name}, "
            f"got {sigma.shape}"
        )
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"mu{name} and sigma{name} must be finite")
    return mu, sigma


def frechet_distance(
    mu1: jax.Array, sigma1: jax.Array, mu2: jax.Array, sigma2: jax.Array
) -> float:
    """The squared Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    Args:
      mu1: ``[D]`` mean of the first distribution.
      sigma1: ``[D, D]`` its symmetric positive semi-definite covariance (singular allowed;
        small asymmetries from floating point are symmetrised away).
      mu2: ``[D]`` mean of the second distribution.
      sigma2: ``[D, D]`` its covariance, as ``sigma1``.

    Returns:
      A Python float ``>= 0`` (computed in float64; tiny negative round-off is clamped to 0). It is
      symmetric in its two arguments and exactly 0 for identical statistics up to round-off.

    Raises:
      ValueError: mismatched shapes or non-finite inputs.
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "1")
    mu2, sigma2 = _check_stats(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must have the same shape, got {mu1.shape} and {mu2.shape}")
    sigma1, sigma2 = _symmetrize(sigma1), _symmetrize(sigma2)
    root1 = _sqrt_psd(sigma1)
    middle = _symmetrize(root1 @ sigma2 @ root1)
    eig = np.linalg.eigvalsh(middle)
    tr_covmean = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
    diff = mu1 - mu2
    d2 = float(diff @ diff) + float(np.trace(sigma1)) + float(np.trace(sigma2)) - 2.0 * tr_covmean
    return max(d2, 0.0)


def feature_statistics(features: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, ``N - 1``) covariance of a feature set, in float64.

    Args:
      features: ``[N, D]`` with ``N >= 2``.

    Returns:
      ``(mu [D], sigma [D, D])`` float64 numpy arrays.
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape [N, D] with N >= 2, got {f.shape}")
    mu = f.mean(axis=0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)
    return mu, sigma


def fid_from_features(features1: jax.Array, features2: jax.Array) -> float:
    """:func:`frechet_distance` of the statistics of two feature sets ``[N1, D]`` and ``[N2, D]``.

    FID is biased upwards for finite ``N`` (the bias shrinks roughly like ``1/N``): compare numbers
    computed with the same ``N`` only.
    """
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def conditional_accuracy(logits: jax.Array, requested_labels: jax.Array) -> jax.Array:
    """Fraction of samples that the classifier assigns to the class they were generated for.

    Args:
      logits: ``[N, K]`` classifier logits of class-conditional samples.
      requested_labels: ``[N]`` int, the class each sample was conditioned on.

    Returns:
      A float32 scalar in ``[0, 1]``.
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(requested_labels)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape [N, K], got {logits.shape}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"requested_labels must have shape [N] = [{logits.shape[0]}], got {labels.shape}"
        )
    return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def class_histogram(logits: jax.Array, *, normalize: bool = False) -> jax.Array:
    """How many samples the classifier assigns to each class.

    Args:
      logits: ``[N, K]`` classifier logits (e.g. of unconditional samples).
      normalize: return fractions summing to 1 instead of counts.

    Returns:
      ``[K]`` int32 counts (or float32 fractions with ``normalize``). For a model that covers the
      classes of MNIST evenly every entry is close to ``N / K``.
    """
    logits = jnp.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape [N, K], got {logits.shape}")
    num_classes = logits.shape[-1]
    counts = jnp.bincount(jnp.argmax(logits, axis=-1), length=num_classes).astype(jnp.int32)
    if normalize:
        return counts.astype(jnp.float32) / max(logits.shape[0], 1)
    return counts
