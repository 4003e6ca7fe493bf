"""The fine-tuning objective of a Stable Diffusion UNet, as diffusers' ``train_text_to_image`` /
``train_dreambooth`` / ``train_text_to_image_lora`` scripts define it.

For latents ``x0`` (the VAE posterior sample times ``scaling_factor``) and text embeddings:
``t ~ U{0..T-1}``, ``noise ~ N(0, I)`` (plus ``noise_offset * N(0, 1)`` of shape ``[B, 1, 1, C]``
when ``noise_offset > 0``: diffusers' ``--noise_offset``), ``x_t = q_sample(x0, t, noise)``, and
the target the folder's scheduler names (``prediction_type``): ``noise`` for ``"epsilon"``, the
velocity ``sqrt(abar) noise - sqrt(1 - abar) x0`` for ``"v_prediction"``; other kinds are refused.
The per-example loss is the mean squared error over ``[h, w, C]`` in float32 (whatever the compute
dtype), times a weight:

- ``snr_gamma``: min-SNR weighting (Hang et al. 2023; diffusers' ``--snr_gamma``):
  ``min(SNR, gamma) / SNR`` for epsilon, ``min(SNR, gamma) / (SNR + 1)`` for v-prediction
  (:func:`jaxdiff.losses.loss_weights`);
- ``weight_fn``: any ``SNR [B] -> weight [B]`` (a general SNR weighting), multiplied in.

DreamBooth's prior preservation (:func:`reduce_loss`): the batch holds instance and class
examples (``prior [B]`` 0 / 1), and the loss is ``mean(instance) + prior_loss_weight *
mean(class)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from jaxdiff.diffusion import q_sample, snr, target_for
from jaxdiff.losses.diffusion import loss_weights
from jaxdiff.schedules import Schedule
from jaxdiff.validation import check_float

__all__ = ["PREDICTION_TYPES", "Objective", "check_prediction_type", "objective_weights",
           "denoising_terms", "reduce_loss"]

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v"}
"""The diffusers ``prediction_type`` values fine-tuning supports, with jaxdiff's names."""


def check_prediction_type(prediction_type: str) -> str:
    """jaxdiff's name (``"eps"`` / ``"v"``) of a scheduler's ``prediction_type``.

    Raises:
      ValueError: naming the value, for anything but ``"epsilon"`` and ``"v_prediction"``.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} (the scheduler config's) is not "
                         f"supported for fine-tuning; supported: {sorted(PREDICTION_TYPES)}")
    return PREDICTION_TYPES[prediction_type]


@dataclasses.dataclass(frozen=True)
class Objective:
    """The loss's options (module docstring).

    Attributes:
      prediction_type: ``"epsilon"`` or ``"v_prediction"`` (the folder's scheduler config's).
      snr_gamma: min-SNR ``gamma > 0``, or None (no min-SNR weighting).
      noise_offset: ``>= 0``; 0 switches it off.
      weight_fn: None, or ``weight_fn(snr [B] float32) -> [B]`` multiplied into the weights
        (traced: jnp operations only).
      prior_loss_weight: DreamBooth's weight of the class (prior) term, ``>= 0``.

    Raises:
      ValueError: a field out of range, naming it.
    """

    prediction_type: str = "epsilon"
    snr_gamma: Optional[float] = None
    noise_offset: float = 0.0
    weight_fn: Optional[Callable[[jax.Array], jax.Array]] = None
    prior_loss_weight: float = 1.0

    def __post_init__(self):
        check_prediction_type(self.prediction_type)
        if self.snr_gamma is not None:
            check_float("snr_gamma", self.snr_gamma, minimum=0.0, exclusive_minimum=True)
        check_float("noise_offset", self.noise_offset, minimum=0.0)
        check_float("prior_loss_weight", self.prior_loss_weight, minimum=0.0)
        if self.weight_fn is not None and not callable(self.weight_fn):
            raise ValueError(f"weight_fn must be callable or None, got {self.weight_fn!r}")

    @property
    def kind(self) -> str:
        """``"eps"`` or ``"v"``."""
        return PREDICTION_TYPES[self.prediction_type]


def objective_weights(objective: Objective, schedule: Schedule, t: jax.Array) -> jax.Array:
    """The per-example weights ``[B]`` float32 at timesteps ``t: [B]`` (1 without options)."""
    if objective.snr_gamma is None:
        w = jnp.ones(jnp.shape(t), jnp.float32)
    else:
        w = loss_weights(schedule, t, prediction_type=objective.kind, weighting="min_snr",
                         min_snr_gamma=float(objective.snr_gamma))
    if objective.weight_fn is not None:
        w = w * jnp.asarray(objective.weight_fn(snr(schedule, t)), jnp.float32)
    return w


def denoising_terms(
    apply_fn: Callable[[jax.Array, jax.Array], jax.Array],
    schedule: Schedule,
    latents: jax.Array,
    key: jax.Array,
    objective: Objective,
    *,
    t: Optional[jax.Array] = None,
    noise: Optional[jax.Array] = None,
    mask: Optional[jax.Array] = None,
    teacher_fn: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None,
    teacher_mask: Optional[jax.Array] = None,
) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """The weighted per-example losses of one batch.

    Args:
      apply_fn: ``apply_fn(x_t [B, h, w, C] float32, t [B] int32) -> prediction`` of the shape
        of ``x_t`` (the UNet with its text context bound).
      schedule: the training noise schedule (``StableDiffusion.schedule``).
      latents: ``x0 [B, h, w, C]``, scaled (``scaling_factor`` applied), float32.
      key: draws ``t``, the noise and the noise offset (split in three).
      objective: the options.
      t, noise: fixed timesteps ``[B]`` / noise (the shape of ``latents``) instead of draws
        (the noise offset is still added when set).
      mask: ``[B, h, w, 1]`` (or ``[B, h, w, C]``) weights in ``[0, 1]`` of each latent
        position, or None (all 1): an example's loss is the mean squared error over its
        weighted positions (``sum(mask * err^2) / sum(mask)``; an all-zero mask gives 0).
      teacher_fn: ``teacher_fn(x_t, t) -> prediction``: the target of the examples that
        ``teacher_mask [B]`` (0 / 1) marks, instead of the data's (distillation: its gradient is
        stopped); the others keep the data's target.

    Raises:
      ValueError: ``teacher_fn`` without ``teacher_mask`` or the other way round, or a
        prediction not shaped like the latents.

    Returns:
      ``(losses [B] float32, {"t": [B], "weight": [B]})``.
    """
    if (teacher_fn is None) != (teacher_mask is None):
        raise ValueError("teacher_fn and teacher_mask go together: pass both or neither")
    latents = jnp.asarray(latents, jnp.float32)
    b, c = latents.shape[0], latents.shape[-1]
    k_t, k_noise, k_offset = jax.random.split(key, 3)
    if t is None:
        t = jax.random.randint(k_t, (b,), 0, schedule.num_timesteps, dtype=jnp.int32)
    if noise is None:
        noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
    if objective.noise_offset:
        noise = noise + objective.noise_offset * jax.random.normal(k_offset, (b, 1, 1, c),
                                                                   jnp.float32)
    x_t = q_sample(schedule, latents, t, noise)
    target = target_for(schedule, latents, t, noise, objective.kind)
    pred = jnp.asarray(apply_fn(x_t, t), jnp.float32)
    if pred.shape != latents.shape:
        raise ValueError(f"apply_fn must return a prediction shaped like the latents "
                         f"{latents.shape}, got {pred.shape}")
    if teacher_fn is not None:
        taught = jax.lax.stop_gradient(jnp.asarray(teacher_fn(x_t, t), jnp.float32))
        if taught.shape != latents.shape:
            raise ValueError(f"teacher_fn must return a prediction shaped like the latents "
                             f"{latents.shape}, got {taught.shape}")
        use = jnp.reshape(jnp.asarray(teacher_mask, jnp.float32),
                          (b,) + (1,) * (latents.ndim - 1))
        target = jnp.where(use > 0, taught, target)
    w = objective_weights(objective, schedule, t)
    axes = tuple(range(1, latents.ndim))
    if mask is None:
        losses = w * jnp.mean(jnp.square(pred - target), axis=axes)
    else:
        m = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), latents.shape)
        losses = w * (jnp.sum(m * jnp.square(pred - target), axis=axes)
                      / jnp.maximum(jnp.sum(m, axis=axes), 1e-6))
    return losses, {"t": t, "weight": w}


def reduce_loss(losses: jax.Array, prior: Any = None,
                prior_loss_weight: float = 1.0) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """The batch loss of per-example ``losses [B]``: their mean, or with ``prior [B]`` (1 for a
    DreamBooth class example, 0 for an instance) ``mean(instance) + prior_loss_weight *
    mean(class)`` (diffusers' ``train_dreambooth``). Returns ``(loss, aux)``; ``aux`` has
    ``instance_loss`` and ``prior_loss`` when ``prior`` is given."""
    if prior is None:
        return jnp.mean(losses), {}
    p = jnp.asarray(prior, jnp.float32)
    inst = jnp.sum(losses * (1 - p)) / jnp.maximum(jnp.sum(1 - p), 1.0)
    prior_loss = jnp.sum(losses * p) / jnp.maximum(jnp.sum(p), 1.0)
    return inst + prior_loss_weight * prior_loss, {"instance_loss": inst,
                                                   "prior_loss": prior_loss}
