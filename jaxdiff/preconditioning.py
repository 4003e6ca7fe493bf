"""EDM preconditioning (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"): a raw network becomes a denoiser. The EDM sampler is
:mod:`jaxdiff.samplers.edm`, the EDM training loss :mod:`jaxdiff.losses.edm`.

EDM works in the variance-exploding parametrisation ``x = y + sigma n`` (``y`` data, ``n ~ N(0,
I)``), with no discrete schedule. The network ``F`` is wrapped into a denoiser (Table 1)::

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))

    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)
    c_out  = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)     (negated for "v", see below)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)
    c_noise = log(sigma) / 4

so that the network's input and training target both have unit variance.

Raw-network contract (:data:`EDMModelFn`): ``model_fn(x_in [B, ...], c_noise [B] float32) -> F
[B, ...]``, called with the already-scaled input ``c_in x`` and ``c_noise`` (diffusers' EDM
``timesteps``). The sampler (:mod:`jaxdiff.samplers.edm`) and the loss
(:func:`jaxdiff.losses.edm_loss`) apply the preconditioning; ``model_fn`` never sees ``sigma``.

``prediction_type`` follows diffusers' ``EDMEulerScheduler.precondition_outputs``: ``"eps"``
(diffusers' ``"epsilon"``) is the paper's ``F``; ``"v"`` (``"v_prediction"``) negates ``c_out``,
for networks trained with the opposite sign (e.g. Playground v2.5). ``"x0"`` is not an EDM
parametrisation and raises.

    >>> import jax.numpy as jnp
    >>> c_skip, c_out, c_in, c_noise = edm_precondition(jnp.float32(0.5), sigma_data=0.5)
    >>> [round(float(c), 4) for c in (c_skip, c_out, c_in, c_noise)]
    [0.5, 0.3536, 1.4142, -0.1733]
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdiff.diffusion import canonical_prediction_type
from jaxdiff.validation import check_batched, check_float

__all__ = [
    "EDM_PREDICTION_TYPES",
    "EDMModelFn",
    "check_edm_prediction_type",
    "check_sigma_data",
    "edm_precondition",
    "edm_denoise",
]

EDM_PREDICTION_TYPES = ("eps", "v")

EDMModelFn = Callable[[jax.Array, jax.Array], jax.Array]
"""``model_fn(x_in: [B, ...], c_noise: [B] float32) -> F: [B, ...]``, the raw EDM network."""


def check_edm_prediction_type(prediction_type: str) -> str:
    """``"eps"`` or ``"v"`` (diffusers' ``"epsilon"`` / ``"v_prediction"`` accepted)."""
    kind = canonical_prediction_type(prediction_type)
    if kind not in EDM_PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type must be one of {EDM_PREDICTION_TYPES} for EDM (diffusers' "
            f"'epsilon' / 'v_prediction'), got {prediction_type!r}"
        )
    return kind


def check_sigma_data(sigma_data: Any) -> float:
    return check_float("sigma_data", sigma_data, minimum=0.0, exclusive_minimum=True)


def edm_precondition(
    sigma: jax.Array | float, sigma_data: float = 0.5, prediction_type: str = "eps"
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(c_skip, c_out, c_in, c_noise)`` at noise level ``sigma`` (Table 1 of the paper).

    Args:
      sigma: noise levels ``> 0`` of any shape (a scalar, or ``[B, 1, ..., 1]`` to broadcast
        against a batch); may be traced.
      sigma_data: the data's standard deviation, a concrete float ``> 0``.
      prediction_type: ``"eps"`` (``c_out > 0``, the paper) or ``"v"`` (``c_out < 0``).

    Returns:
      Four arrays of ``sigma``'s shape, in at least float32. ``c_noise = log(sigma) / 4``
      (``-inf`` at ``sigma = 0``).
    """
    sd = check_sigma_data(sigma_data)
    kind = check_edm_prediction_type(prediction_type)
    sigma = jnp.asarray(sigma)
    sigma = sigma.astype(jnp.promote_types(sigma.dtype, jnp.float32))
    var = sigma**2 + sd**2
    c_skip = sd**2 / var
    c_out = sigma * sd / jnp.sqrt(var)
    if kind == "v":
        c_out = -c_out
    c_in = 1.0 / jnp.sqrt(var)
    c_noise = 0.25 * jnp.log(sigma)
    return c_skip, c_out, c_in, c_noise


def edm_denoise(
    model_fn: EDMModelFn,
    x: jax.Array,
    sigma: jax.Array | float,
    *,
    sigma_data: float = 0.5,
    prediction_type: str = "eps",
) -> jax.Array:
    """The preconditioned denoiser ``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)``.

    Args:
      model_fn: the raw network (:data:`EDMModelFn`).
      x: ``[B, ...]`` noisy samples (at least float32 is used for the skip connection).
      sigma: a scalar shared by the batch, or ``[B]`` per example; ``> 0``.
      sigma_data, prediction_type: see :func:`edm_precondition`.

    Returns:
      ``D [B, ...]`` in ``x``'s dtype promoted to at least float32. A model output of another
      shape raises ``ValueError``.
    """
    x = check_batched("x", x)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, dtype), (x.shape[0],))
    c_skip, c_out, c_in, c_noise = edm_precondition(sigma, sigma_data, prediction_type)
    bshape = (-1,) + (1,) * (x.ndim - 1)
    x = x.astype(dtype)
    out = model_fn(c_in.reshape(bshape) * x, c_noise)
    if jnp.shape(out) != x.shape:
        raise ValueError(f"model_fn's output must have shape {x.shape}, got {jnp.shape(out)}")
    return c_skip.reshape(bshape) * x + c_out.reshape(bshape) * out.astype(dtype)
