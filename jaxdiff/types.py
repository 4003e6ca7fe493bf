"""Shared type aliases: one definition each, imported by name.

- :data:`ModelFn`: ``model_fn(x: [B, ...], t: [B] int32) -> [B, ...]``, a denoiser whose output is
  an eps, x0 or v prediction (by the sampler's ``prediction_type``), with ``x``'s shape (``2C``
  channels on the last axis for learned-variance models).
- :data:`CondModelFn`: ``model_fn(x, t, cond) -> [B, ...]``, the same with a conditioning pytree
  whose leaves have batch axis ``B`` (labels ``[B]``, a text context ``[B, L, D]``, ...);
  :func:`jaxdiff.samplers.classifier_free_guidance` turns one into a :data:`ModelFn`.
- :data:`PRNGKey`: a typed key (``jax.random.key``) or a legacy ``uint32[2]`` key array.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

__all__ = ["ModelFn", "CondModelFn", "PRNGKey"]

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
CondModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
PRNGKey = jax.Array
