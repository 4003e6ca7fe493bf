"""The VAE objective (reconstruction + beta * KL) and reconstruction metrics, pure and jittable.

The loss takes the autoencoder as ``apply_fn(params, x, key) -> (reconstruction, posterior)``
(``AutoencoderKL(config).apply`` with ``{"params": ...}`` variables, or any function returning a
:class:`~jaxdiff.models.DiagonalGaussian`), so that any model plugs in.

    >>> import jax, jax.numpy as jnp
    >>> from jaxdiff.models import DiagonalGaussian
    >>> def apply_fn(params, x, key):                 # a toy "autoencoder"
    ...     post = DiagonalGaussian(params["w"] * x, jnp.zeros_like(x))
    ...     return post.sample(key), post
    >>> x = jnp.ones((4, 8, 8, 1))
    >>> loss, aux = vae_loss(apply_fn, {"w": 1.0}, x, jax.random.key(0), beta=0.1)
    >>> loss.shape, aux["per_example"].shape, aux["kl"].shape
    ((), (4,), (4,))
    >>> m = reconstruction_metrics(x, x + 0.1)
    >>> [round(float(v), 2) for v in (m["mse"][0], m["psnr"][0])]
    [0.01, 26.02]
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdiff.validation import check_batched, check_choice, check_float

__all__ = ["RECON_TYPES", "vae_loss", "reconstruction_metrics"]

RECON_TYPES = ("l1", "l2")


def vae_loss(
    apply_fn: Callable[[Any, jax.Array, jax.Array | None], tuple[jax.Array, Any]],
    params: Any,
    x: jax.Array,
    key: jax.Array | None,
    *,
    beta: float = 1e-6,
    recon_type: str = "l1",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss of one batch: ``mean_b[(sum_pixels err(x, x_hat) + beta * KL_b) / D]``.

    ``err`` is ``|x - x_hat|`` (``"l1"``) or ``(x - x_hat)^2`` (``"l2"``), ``KL_b`` is
    ``KL(q(z | x_b) || N(0, I))`` summed over the latent, and ``D = H * W * C`` of ``x``: the
    latent-diffusion autoencoder's ``rec + kl_weight * kl`` (``beta`` = its ``kl_weight``) per
    input element, so the reconstruction term is a per-pixel mean.

    Args:
      apply_fn: ``(params, x, key) -> (x_hat [B, H, W, C], posterior)``, where the posterior
        has ``kl() -> [B]`` (:class:`~jaxdiff.models.DiagonalGaussian`); ``key`` draws ``z``.
      params: passed to ``apply_fn``.
      x: images ``[B, H, W, C]``.
      key: passed to ``apply_fn`` (``None``: it decodes the posterior's mode).
      beta: the KL weight, a number ``>= 0``.
      recon_type: ``"l1"`` or ``"l2"``.

    Returns:
      ``(loss, aux)``: the scalar float32 loss and ``{"per_example": [B], "recon": [B]`` (the
      per-pixel mean error) ``, "kl": [B]`` (the summed KL) ``}``.

    Raises:
      ValueError: naming ``beta``, ``recon_type``, ``x``, or ``apply_fn`` when its
        reconstruction is not shaped like ``x``.
    """
    beta = check_float("beta", beta, minimum=0.0)
    check_choice("recon_type", recon_type, RECON_TYPES)
    x = check_batched("x", x)
    if x.ndim != 4:
        raise ValueError(f"x must be [B, H, W, C], got shape {x.shape}")
    x_hat, posterior = apply_fn(params, x, key)
    if jnp.shape(x_hat) != x.shape:
        raise ValueError(
            f"apply_fn must return a reconstruction shaped like x {x.shape}, got {jnp.shape(x_hat)}"
        )
    err = (x_hat - x).astype(jnp.float32)
    err = jnp.abs(err) if recon_type == "l1" else jnp.square(err)
    recon = jnp.mean(err, axis=(1, 2, 3))
    kl = posterior.kl().astype(jnp.float32)
    per_example = recon + beta * kl / (x.shape[1] * x.shape[2] * x.shape[3])
    return jnp.mean(per_example), {"per_example": per_example, "recon": recon, "kl": kl}


def reconstruction_metrics(
    x: jax.Array, x_hat: jax.Array, *, data_range: float = 2.0
) -> dict[str, jax.Array]:
    """Per-example ``{"mse": [B], "psnr": [B]}`` of ``x_hat`` against ``x`` (``[B, ...]``).

    ``mse`` is in the data's units; ``psnr = 10 log10(data_range^2 / mse)`` in dB (``data_range``
    2 for images in ``[-1, 1]``, which equals the PSNR of the same images mapped to ``[0, 1]``).
    float32.

    Raises:
      ValueError: naming ``x_hat`` when the shapes differ, or ``data_range`` (> 0).
    """
    data_range = check_float("data_range", data_range, minimum=0.0, exclusive_minimum=True)
    x, x_hat = check_batched("x", x), check_batched("x_hat", x_hat)
    if x.shape != x_hat.shape:
        raise ValueError(f"x_hat must have the shape of x {x.shape}, got {x_hat.shape}")
    axes = tuple(range(1, x.ndim))
    mse = jnp.mean(jnp.square((x_hat - x).astype(jnp.float32)), axis=axes)
    return {"mse": mse, "psnr": 10.0 * jnp.log10(data_range**2 / mse)}
