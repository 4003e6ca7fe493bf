"""The EDM training loss (Karras et al. 2022): log-normal noise levels and the loss weighting.

Training draws ``ln(sigma) ~ N(P_mean, P_std^2)`` and weights ``||D(y + n; sigma) - y||^2`` by
``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2``: the effective
loss on the raw network ``F`` has unit weight at every noise level. ``D`` is the preconditioned
denoiser of :mod:`jaxdiff.preconditioning`.

    >>> import jax.numpy as jnp
    >>> from jaxdiff.preconditioning import edm_precondition
    >>> _, c_out, _, _ = edm_precondition(jnp.float32(0.5), sigma_data=0.5)
    >>> round(float(edm_loss_weight(jnp.float32(0.5)) * c_out**2), 6)
    1.0
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.preconditioning import EDMModelFn, check_sigma_data, edm_denoise
from jaxdiff.validation import check_batched, check_float

__all__ = ["edm_loss_weight", "edm_sample_sigma", "edm_loss"]


def edm_loss_weight(sigma: jax.Array | float, sigma_data: float = 0.5) -> jax.Array:
    """``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2`` (``= 1 / c_out^2``),
    elementwise over ``sigma > 0``; at least float32."""
    sd = check_sigma_data(sigma_data)
    sigma = jnp.asarray(sigma)
    sigma = sigma.astype(jnp.promote_types(sigma.dtype, jnp.float32))
    return (sigma**2 + sd**2) / (sigma * sd) ** 2


def edm_sample_sigma(
    key: jax.Array, shape: tuple[int, ...], *, P_mean: float = -1.2, P_std: float = 1.2
) -> jax.Array:
    """Training noise levels: ``sigma = exp(P_mean + P_std z)``, ``z ~ N(0, 1)`` (log-normal),
    float32 of ``shape``. ``P_std`` must be ``>= 0``."""
    mean = check_float("P_mean", P_mean)
    std = check_float("P_std", P_std, minimum=0.0)
    return jnp.exp(mean + std * jax.random.normal(key, shape, jnp.float32))


def edm_loss(
    model_fn: EDMModelFn,
    y: jax.Array,
    key: jax.Array | None,
    *,
    sigma_data: float = 0.5,
    prediction_type: str = "eps",
    P_mean: float = -1.2,
    P_std: float = 1.2,
    sigma: jax.Array | None = None,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The EDM training loss of one batch, ``mean_b lambda(sigma_b) mean ||D(y_b + sigma_b n_b;
    sigma_b) - y_b||^2``.

    Args:
      model_fn: the raw network (:data:`EDMModelFn`); close over the parameters to differentiate.
      y: ``[B, ...]`` clean data.
      key: draws ``sigma`` (:func:`edm_sample_sigma`) and ``n``; may be ``None`` when both
        ``sigma`` and ``noise`` are given.
      sigma_data, prediction_type: see :func:`~jaxdiff.preconditioning.edm_precondition`.
      P_mean, P_std: the log-normal training distribution of ``sigma``.
      sigma: optional fixed ``[B]`` noise levels; noise: optional fixed ``[B, ...]`` standard
        normal ``n``.

    Returns:
      ``(loss, {"per_example": [B], "sigma": [B], "weight": [B]})``.
    """
    y = check_batched("y", y)
    y = y.astype(jnp.promote_types(y.dtype, jnp.float32))
    if (sigma is None or noise is None) and key is None:
        raise ValueError("key is required unless both sigma and noise are given")
    k_sigma, k_noise = jax.random.split(key) if key is not None else (None, None)
    if sigma is None:
        sigma = edm_sample_sigma(k_sigma, (y.shape[0],), P_mean=P_mean, P_std=P_std)
    sigma = jnp.asarray(sigma, y.dtype)
    if sigma.shape != (y.shape[0],):
        raise ValueError(f"sigma must have shape [B] = ({y.shape[0]},), got {sigma.shape}")
    if noise is None:
        noise = jax.random.normal(k_noise, y.shape, y.dtype)
    if jnp.shape(noise) != y.shape:
        raise ValueError(f"noise must have y's shape {y.shape}, got {jnp.shape(noise)}")
    x = y + sigma.reshape((-1,) + (1,) * (y.ndim - 1)) * noise
    d = edm_denoise(model_fn, x, sigma, sigma_data=sigma_data, prediction_type=prediction_type)
    w = edm_loss_weight(sigma, sigma_data)
    per_example = w * jnp.mean((d - y) ** 2, axis=tuple(range(1, y.ndim)))
    return jnp.mean(per_example), {"per_example": per_example, "sigma": sigma, "weight": w}
